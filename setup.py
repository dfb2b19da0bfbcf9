from setuptools import find_packages, setup

setup(
    name="conditional_detr",
    version="0.1.0",
    description="Conditional DETR as a detectron2 project",
    packages=find_packages(exclude=("tests", "configs")),
    python_requires=">=3.10",
)
