from setuptools import find_packages, setup

setup(
    name="jumprelu",
    version="0.1.0",
    description="JumpReLU sparse autoencoders in JAX (Rajamanoharan et al. 2024; Gemma Scope)",
    python_requires=">=3.11",
    packages=find_packages(include=["jumprelu", "jumprelu.*", "configs"]),
    install_requires=[
        "jax>=0.10", "flax>=0.12", "optax>=0.2.8", "orbax-checkpoint>=0.12",
        "ml_collections>=1.0", "absl-py", "numpy", "chex",
        "safetensors",  # the SAELens export (export.py)
        "gguf", "tokenizers",  # the LM: GGUF dequantisation and the tokenizer, no torch
        "matplotlib",  # scripts/plots.py, which the README's commands run
        "tensorboardX>=2.6", "tqdm",  # TensorBoard event files and progress bars (logs.py)
        "fsspec",  # local and bucket paths for the store (storage.py); memory:// in the tests
    ],
    extras_require={
        # pytest-xdist runs the suite on both cores (.ci/run); tensorboard reads our event files
        # back; nbclient & co. run notebooks/quickstart.ipynb
        # torch, transformers and accelerate are the parity references (tests/lm); torch is
        # pinned to the CPU build (an unpinned torch pulls several GB of CUDA packages).
        "test": ["pytest", "pytest-xdist", "tensorboard", "nbclient", "nbformat", "ipykernel",
                 "torch==2.13.0", "transformers", "accelerate", "datasets",
                 # tests/test_aot.py compiles for TPU topologies without a TPU (jax 0.10's pin)
                 "libtpu==0.0.42.*; sys_platform == 'linux' and platform_machine == 'x86_64'"],
        "notebook": ["ipykernel"],
        "wandb": ["wandb"],  # log.wandb_project; TensorBoard event files need no extra
        "gcs": ["gcsfs"],  # a store in a gs:// bucket (data.path, harvest into gs://…)
        # scripts/bench.py: the PyTorch floor and the SAELens peer (torch pinned as for "test")
        "bench": ["torch==2.13.0", "sae-lens>=6.54"],
    },
)
