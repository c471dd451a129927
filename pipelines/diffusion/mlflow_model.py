"""A saved ``ComposerPipeline`` in the MLflow model registry: log and register it, resolve it back.

    export dir (save_pretrained) -> log_pipeline -> models:/<name>/<version>
    models:/… or runs:/… -> resolve_model -> a local pipeline directory -> from_pretrained

The registered model is a pyfunc whose one artifact is the pipeline directory exactly as
``ComposerPipeline.save_pretrained`` wrote it (safetensors, configs, model_index.json), so the
main use — ``recompose generate --model models:/<name>/<version>`` — loads it with diffusers'
own loader. The pyfunc (``ComposerPyfunc``) is a convenience for ``mlflow models serve
--env-manager local`` in an environment where recompose is installed: captions and seeds in,
PNG bytes out. It is logged as "models from code" (a three-line script naming the class), not a
cloudpickle, so that, like the weights, nothing is ever unpickled.

Logged layout (the model's artifact root, ``<experiment artifacts>/models/<model id>/artifacts``)::

    MLmodel                  python_function flavour; artifacts.pipeline.path says where the pipeline is
    composer_pyfunc.py       the models-from-code script
    requirements.txt, python_env.yaml, conda.yaml
    artifacts/<export dir name>/model_index.json, unet/…, scheduler/…, [vae/…]
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from pipelines.tracking import resolve_uri

# The pyfunc's inputs: one row per image; both columns optional (no text: unconditional).
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "text", required=False), ColSpec("long", "seed", required=False)]),
    outputs=Schema([ColSpec("binary", "image")]),
    # MLflow passes predict() only the params its signature declares, so both are listed.
    params=ParamSchema([ParamSpec("num_inference_steps", "long", 50), ParamSpec("guidance", "double", 3.0)]),
)
# Pinned from this environment rather than inferred: MLflow infers requirements by loading the
# whole model in a subprocess to record its imports, which is slow for a real pipeline. recompose
# itself is on no package index, hence --env-manager local.
REQUIREMENTS = (
    "mlflow",
    "torch",
    "diffusers",
    "accelerate",
    "transformers",
    "safetensors",
    "numpy",
    "pandas",
    "pillow",
    "pyyaml",
)
_MODEL_CODE = (
    "from mlflow.models import set_model\n\n"
    "from pipelines.diffusion.mlflow_model import ComposerPyfunc\n\n"
    "set_model(ComposerPyfunc())\n"
)


class ComposerPyfunc(mlflow.pyfunc.PythonModel):
    """``mlflow.pyfunc`` face of a ComposerPipeline: a caption (or none) and a seed per row -> a PNG."""

    def load_context(self, context: Any) -> None:
        from pipelines.diffusion.loading import resolve_device
        from pipelines.diffusion.pipeline import ComposerPipeline

        self.device = resolve_device("auto")
        from pipelines.diffusion.ensemble import attach_experts

        path = context.artifacts["pipeline"]
        self.pipe = attach_experts(ComposerPipeline.from_pretrained(path).to(self.device), path)
        self.pipe.set_progress_bar_config(disable=True)

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """Columns ``text`` (str, optional) and ``seed`` (int, default the row number) -> ``image`` (PNG bytes)."""
        from pipelines.data.decomposer import ImageDecomposer
        from pipelines.files import encode_png

        params = {"num_inference_steps": 50, "guidance": 3.0, **(params or {})}
        n = len(model_input)
        texts = model_input["text"] if "text" in model_input else [None] * n
        seeds = model_input["seed"] if "seed" in model_input else range(n)
        # The decomposer turns text into what this model's caption encoder takes (the text
        # itself for a trainable encoder, frozen CLIP/T5 embeddings otherwise).
        dec = ImageDecomposer.for_pipeline(self.pipe, self.device)
        images = []
        for i, (text, seed) in enumerate(zip(texts, seeds, strict=True)):
            conditions = {} if text is None or pd.isna(text) else dec.caption(str(text))
            out = self.pipe(
                conditions,
                guidance=float(params["guidance"]),
                num_inference_steps=int(params["num_inference_steps"]),
                seed=i if pd.isna(seed) else int(seed),
            )
            images.append(encode_png(out.images[0]))
        return pd.DataFrame({"image": images})


STEP_TAG = "recompose.step"  # a registered version's training step, with RUN_TAG its identity
RUN_TAG = "recompose.run_id"


def registered_version(registered_model_name: str, run_id: str, step: int) -> tuple[str, int] | None:
    """``(models:/<name>/<version>, version)`` of the version that ``log_pipeline`` registered for
    this run and step, or None: a rerun after a crash between registering and recording it
    finds it here instead of registering a duplicate."""
    client = mlflow.MlflowClient()
    try:
        versions = client.search_model_versions(f"name = '{registered_model_name}'")
    except mlflow.exceptions.MlflowException:
        return None
    for v in versions:
        tags = v.tags or {}
        if tags.get(RUN_TAG) == run_id and tags.get(STEP_TAG) == str(step):
            return f"models:/{registered_model_name}/{v.version}", int(v.version)
    return None


def log_pipeline(
    export_dir: str | Path,
    registered_model_name: str | None,
    name: str = "pipeline",
    run_id: str | None = None,
    step: int | None = None,
) -> tuple[str, int | None]:
    """Logs the pipeline directory ``export_dir`` to the active run as a pyfunc model ``name``.

    Registers it as ``registered_model_name`` when given, the version tagged with ``run_id`` and
    ``step`` when given (``registered_version`` finds it by them). Returns ``(model_uri,
    version)``: ``models:/<name>/<version>`` when registered (version None and the logged model's
    own ``models:/<model id>`` otherwise).
    """
    from importlib.metadata import PackageNotFoundError, version

    if mlflow.active_run() is None:
        raise RuntimeError("log_pipeline needs an active MLflow run (inside `with mlflow.start_run():`)")
    export_dir = Path(export_dir)
    if not (export_dir / "model_index.json").is_file():
        raise ValueError(f"{export_dir}: not a saved pipeline (no model_index.json)")
    requirements = []
    for package in REQUIREMENTS:
        try:
            requirements.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            requirements.append(package)
    with tempfile.TemporaryDirectory() as tmp:
        code = Path(tmp) / "composer_pyfunc.py"
        code.write_text(_MODEL_CODE)
        with warnings.catch_warnings():
            # An input example would make MLflow run the model at logging time (50 steps) to check it.
            warnings.filterwarnings("ignore", message=".*An input example was not provided")
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=str(code),
                artifacts={"pipeline": str(export_dir)},
                signature=SIGNATURE,
                pip_requirements=requirements,
            )
    if registered_model_name is None:
        return info.model_uri, None
    tags = {RUN_TAG: run_id, STEP_TAG: str(step)} if run_id is not None and step is not None else None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Registered model .* already exists")
        registered = mlflow.register_model(info.model_uri, registered_model_name, tags=tags)
    v = int(registered.version)
    return f"models:/{registered_model_name}/{v}", v


def _pin(uri: str, tracking_uri: str) -> tuple[str, str]:
    """``uri`` with an alias, stage or 'latest' resolved to its version, and a cache key for it."""
    from mlflow.store.artifact.utils.models import _parse_model_uri, get_model_name_and_version

    key = uri
    if uri.startswith("models:/") and _parse_model_uri(uri).name is not None:
        client = mlflow.MlflowClient(tracking_uri)
        model, v = get_model_name_and_version(client, uri)
        uri = f"models:/{model}/{v}"
        # A version deleted and registered again is another model: its source differs.
        key = f"{uri} {client.get_model_version(model, v).source}"
    return uri, hashlib.sha256(f"{tracking_uri}\n{key}".encode()).hexdigest()[:16]


def _pipeline_dir(root: Path, uri: str) -> Path:
    """The pipeline directory in a downloaded model: the root itself, or the pyfunc's artifact."""
    if (root / "model_index.json").is_file():
        return root
    if (root / "MLmodel").is_file():
        from mlflow.models import Model

        artifact = Model.load(str(root)).flavors.get("python_function", {}).get("artifacts", {})
        path = artifact.get("pipeline", {}).get("path")
        if path and (root / path / "model_index.json").is_file():
            return root / path
    raise ValueError(f"{uri}: holds no saved ComposerPipeline (no model_index.json, no pipeline artifact)")


def resolve_model(uri: str, tracking_uri: str | None = None) -> Path:
    """``models:/<name>/<version>``, ``models:/<name>@<alias>`` or ``runs:/<run id>/<path>`` -> a
    local pipeline directory, downloaded once into ``$RECOMPOSE_CACHE/mlflow`` (default
    ``~/.cache/recompose``). The tracking server: ``tracking_uri``, else ``$MLFLOW_TRACKING_URI``,
    else MLflow's current one (``pipelines/tracking.py``'s precedence)."""
    if not uri.startswith(("models:/", "runs:/")):
        raise ValueError(
            f"{uri}: expected models:/<name>/<version>, models:/<name>@<alias> or runs:/<id>/<path>"
        )
    tracking_uri = resolve_uri(tracking_uri, mlflow.get_tracking_uri())
    try:
        pinned, key = _pin(uri, tracking_uri)
        cache = Path(os.environ.get("RECOMPOSE_CACHE", Path.home() / ".cache" / "recompose")) / "mlflow"
        root = cache / key
        if not root.is_dir():
            cache.mkdir(parents=True, exist_ok=True)
            # Downloaded beside the cache entry, then renamed: an interrupted download leaves no entry.
            with tempfile.TemporaryDirectory(dir=cache, prefix=f".{key}-", ignore_cleanup_errors=True) as tmp:
                local = mlflow.artifacts.download_artifacts(
                    artifact_uri=pinned, dst_path=tmp, tracking_uri=tracking_uri
                )
                try:
                    os.replace(local, root)
                except OSError:  # another process finished first
                    if not root.is_dir():
                        raise
    except MlflowException as e:
        raise ValueError(f"{uri}: {e.message}") from None
    except OSError as e:
        raise ValueError(f"{uri}: could not download the model ({e})") from None
    try:
        return _pipeline_dir(root, uri)
    except ValueError:
        shutil.rmtree(root, ignore_errors=True)  # not a pipeline: nothing worth keeping
        raise
