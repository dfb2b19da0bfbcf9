"""
Repack the PyPI republish of detectron2 (sal-detectron2, upstream Python files at
commit a59f0563) as a pure-Python wheel for machines that cannot reach GitHub.

Its bundled `_C` extension was built for Python 3.10 and an old torch and cannot
load, so it is replaced by a module whose import fails with a clear message; nothing
in this project needs detectron2's compiled ops.

Usage: python scripts/repack_detectron2.py SRC.whl DST_DIR
"""
import base64
import hashlib
import sys
import zipfile
from pathlib import Path

STUB_C_MODULE = '''"""detectron2's compiled ops are not built in this installation."""

# Raising at import lets detectron2's own fallbacks take over (pycocotools instead of
# its C++ COCOeval) and tells a caller of a compiled op what is missing.
raise ImportError(
    "detectron2._C is unavailable: this detectron2 was installed from its pure-Python "
    "republish without compiled ops. Install detectron2 from source "
    "(pip install 'git+https://github.com/facebookresearch/detectron2.git') to use them."
)
'''


def _record_line(name, data):
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def repack(src, dst_dir):
    src = Path(src)
    with zipfile.ZipFile(src) as zin:
        entries = {
            info.filename: zin.read(info)
            for info in zin.infolist()
            if not info.filename.endswith(".so") and not info.is_dir()
        }
    dist_info = next(n.split("/")[0] for n in entries if n.endswith(".dist-info/WHEEL"))
    entries["detectron2/_C.py"] = STUB_C_MODULE.encode()
    wheel_meta = entries[f"{dist_info}/WHEEL"].decode().splitlines()
    wheel_meta = [line for line in wheel_meta if not line.startswith(("Tag:", "Root-Is-Purelib:"))]
    wheel_meta += ["Root-Is-Purelib: true", "Tag: py3-none-any"]
    entries[f"{dist_info}/WHEEL"] = ("\n".join(wheel_meta) + "\n").encode()

    record_name = f"{dist_info}/RECORD"
    entries.pop(record_name, None)
    record = [_record_line(name, data) for name, data in entries.items()]
    record.append(f"{record_name},,")
    entries[record_name] = ("\n".join(record) + "\n").encode()

    name, version = dist_info[: -len(".dist-info")].rsplit("-", 1)
    dst = Path(dst_dir) / f"{name}-{version}-py3-none-any.whl"
    dst.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for entry_name, data in entries.items():
            zout.writestr(entry_name, data)
    print(dst)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    repack(sys.argv[1], sys.argv[2])
