"""
What the tests share: the repository's paths (`paths`), the official implementation's
reference outputs and configs of its architectures (`official`), COCO-format files
(`coco`), the tiny models and batches (`tiny`), the inputs of the compiled ops (`ops`) and
the instant-training config (`training`). Test modules import from here, never from each
other; `conftest.py` holds the fixtures.
"""
