from setuptools import find_packages, setup

setup(
    name="megatron_ufp4",
    version="0.1.0",
    description="Megatron-style LLM pretraining with pluggable FP4 GEMMs and the UFP4 recipe",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megatron_ufp4", "megatron_ufp4.*"]),
    python_requires=">=3.10",
    # torch>=2.7: torch.float8_e8m0fnu (MXFP4's E8M0 scales), new in 2.7; install torch (CPU: torch==2.13.0) first.
    install_requires=["torch>=2.7", "numpy", "pyyaml", "sentencepiece", "tokenizers", "tqdm"],
    extras_require={
        # triton: the CPU tests run the Triton backend's kernels in its interpreter
        "dev": ["pytest", "pytest-timeout", "matplotlib", "scipy", "ruff==0.17.6", "triton>=3.3,<4", "transformers",
                "safetensors",
                # the reference implementation the dataset tests compare against (its datasets run on a CPU)
                "megatron-core==0.16.1"],
        "plot": ["matplotlib"],
        "hf": ["transformers", "safetensors"],  # tools/export_hf.py, tools/import_hf.py (docs/huggingface.md)
        "study": ["scipy", "matplotlib"],  # the study runner's statistics and figures
        "gpu": ["triton>=3.3"],
        "wandb": ["wandb"],
        "tensorboard": ["tensorboard"],
    },
    entry_points={"console_scripts": [
        "megatron-ufp4-train=megatron_ufp4.train:main",
        "megatron-ufp4-eval=megatron_ufp4.eval:main",
        "megatron-ufp4-sample=megatron_ufp4.sample:main",
        "megatron-ufp4-prepare=megatron_ufp4.data.prepare:main",
        "megatron-ufp4-study=megatron_ufp4.study.__main__:main",
    ]},
)
