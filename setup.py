"""omnikv-runtime: OmniKV dynamic context selection with a tiered KV cache for transformers 5.x."""

from pathlib import Path

from setuptools import setup

setup(
    name="omnikv-runtime",
    version="0.1.0",
    description="OmniKV (ICLR 2025) dynamic context selection with a memory-tiered KV cache for HF transformers",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "omnikv_runtime",
        "omnikv_runtime.transfer",
        "omnikv_runtime.policies",
        "omnikv_runtime.configs",
        "omnikv_runtime.cache",
        "omnikv_runtime.cli",
        "omnikv_runtime.config",
        "omnikv_runtime.decode",
        "omnikv_runtime.engine",
        "omnikv_runtime.eval",
        "omnikv_runtime.kernels",
        "omnikv_runtime.models",
        "omnikv_runtime.planner",
        "omnikv_runtime.profiling",
        "omnikv_runtime.serve",
    ],
    package_dir={
        "omnikv_runtime": "omnikv_runtime",
        "omnikv_runtime.transfer": "transfer",
        "omnikv_runtime.policies": "policies",
        "omnikv_runtime.configs": "configs",
    },
    package_data={"omnikv_runtime.configs": ["*.json"]},
    install_requires=[
        "torch>=2.5",  # scaled_dot_product_attention(enable_gqa=...)
        "transformers>=5.4,<6",
        "pydantic>=2.5",
        "psutil>=5.9",
        "tqdm>=4.60",  # progress bars of the omnikv commands
    ],
    extras_require={
        "smollm2": ["gguf>=0.10", "accelerate>=1.0"],
        "test": [
            "pytest>=8",
            "ruff>=0.6",
            "gguf>=0.10",
            "accelerate>=1.0",
            "triton>=3.0",
            "jieba>=0.42",
            "matplotlib>=3.7",
            "deepspeed>=0.16",  # pure Python without CUDA: the two-rank tensor-parallel test runs on gloo
            "fastapi>=0.110",
            "uvicorn>=0.29",
            "openai>=1.40",  # the live server tests drive the API with the official client
            "httpx>=0.27",
        ],
        "plot": ["matplotlib>=3.7"],
        "eval": ["jieba>=0.42", "matplotlib>=3.7"],
        "gpu": ["triton>=3.0"],
        "flash": ["flash-attn>=2.6"],
        "deepspeed": ["deepspeed>=0.16"],
        "serve": ["fastapi>=0.110", "uvicorn>=0.29"],
    },
    entry_points={"console_scripts": ["omnikv=omnikv_runtime.cli:main"]},
)
