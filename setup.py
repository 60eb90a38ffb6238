"""motif-jax: a JAX/Flax training stack for the Motif-2 language models."""

import setuptools

setuptools.setup(
    name="motif-jax",
    version="0.1.0",
    description="JAX/Flax training stack for Motif-2: Grouped Differential Attention, PolyNorm, MuonClip.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.12",
    # gin_configs installs beside the packages (as package data), so that `include 'gin_configs/...'`
    # and --gin_file=gin_configs/... resolve from a non-editable install too.
    packages=setuptools.find_packages(include=["motif_jax", "motif_jax.*", "pallas_kernels",
                                               "gin_configs", "gin_configs.*"]),
    package_data={"gin_configs": ["*.gin"], "gin_configs.models": ["*.gin"],
                  "gin_configs.experiments": ["*.gin"], "gin_configs.data": ["*.gin"],
                  "gin_configs.platforms": ["*.gin"]},
    install_requires=[
        "jax>=0.11.2",
        "flax>=0.12.10",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.11.0",
        "gin-config>=0.5.0",
        "absl-py>=2.1.0",
        "numpy>=2.0",
        "tensorboardX>=2.6",
        "tensorboard>=2.18",  # the README's `tensorboard --logdir WORKDIR/logs`
        "seqio>=0.0.19",
        "sentencepiece>=0.2.0",  # motif_jax.data.tokenizer trains and loads SentencePiece models
        "tensorflow>=2.18",
        "tensorflow-datasets>=4.9.7",
        "importlib_resources>=6.0",  # tensorflow-datasets imports it without declaring it
    ],
    extras_require={
        "test": ["pytest>=8.0"],
        "gpu": ["jax[cuda13]>=0.11.2"],
        "tpu": ["jax[tpu]>=0.11.2"],
    },
)
