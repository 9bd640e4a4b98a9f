"""bbu_jax: Qwen2.5-VL fine-tuning, batched inference and evaluation for telecom-cabinet photos."""

from setuptools import find_packages, setup

setup(
    name="bbu_jax",
    version="0.1.0",
    description="JAX/Flax Qwen2.5-VL detection fine-tuning, inference and evaluation for BBU cabinets",
    python_requires=">=3.10",
    packages=find_packages(include=["bbu_jax", "bbu_jax.*", "convert_weights", "convert_weights.*",
                                    "configs", "configs.*"]),
    install_requires=[
        "jax>=0.6",
        "flax>=0.12",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.10",
        "ml-collections>=1.0",
        "numpy",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "pycocotools>=2.0.8",
        "pillow>=10",
        "tensorboardX>=2.6",
        "tqdm",
        "scipy",
        "tensorflow-datasets>=4.9.7",
        "array_record>=0.5",
        "importlib_resources",  # tfds builders defined in a package resolve their code path with it
    ],
    extras_require={
        # torch is pinned: a bare `torch` pulls a multi-GB CUDA build; 2.13.0 is a CPU build.
        "test": [
            "torch==2.13.0",
            "transformers>=4.50",
            "pytest>=8",
            "pytest-timeout",
            "hypothesis>=6",
            "psutil>=5",
        ],
        "tpu": ["libtpu"],
    },
)
