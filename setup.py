from setuptools import find_packages, setup

setup(
    name="mobileformer-det",
    version="0.2.0",
    description="Mobile-Former (CVPR 2022) as a Detectron2 backbone, with MF-DETR, a DETR-style detector",
    packages=find_packages(include=["mobileformer_det", "mobileformer_det.*"]),
    python_requires=">=3.9",
    # Detectron2 is not on PyPI: tools/install_detectron2.py installs it (see README).
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "fvcore>=0.1.5",
        "iopath>=0.1.9",
        "pycocotools>=2.0.2",
        "opencv-python-headless>=4.5",
        "scipy>=1.7",
        "numpy>=1.22",
        "Pillow>=9.0",
        "tqdm",
        "filelock",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-xdist>=3"],
        # tools/export_onnx.py and the onnxruntime / openvino runtimes of the demo and benchmark
        "export": ["onnx>=1.14", "onnxruntime>=1.16", "openvino>=2024.0"],
        # tools/benchmark.py --task peers (D-FINE, RT-DETRv2, Deformable DETR, DETR; Apache-2.0) and
        # tools/compare_learning.py (D-FINE-N trained beside MF-DETR)
        "bench": ["transformers>=5.0"],
    },
)
