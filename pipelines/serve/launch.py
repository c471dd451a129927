"""Starting the Serve app for a config: check the model, join or start Ray, deploy, wait.

``recompose serve`` calls ``deploy`` then ``block``; the quickstart calls ``deploy`` only.
"""

from __future__ import annotations

import logging
import os
import time

from pipelines.diffusion.loading import check_model
from pipelines.errors import UserError
from pipelines.serve.config import ServeConfig

log = logging.getLogger(__name__)


def deploy(cfg: ServeConfig) -> str:
    """Deploy the app of ``cfg`` and return its base URL once it is ready.

    Serving on a non-loopback host without authentication is refused (``UserError``) unless
    ``cfg.allow_unauthenticated``. The model directory is checked here first (``ModelError``, a user error), so a bad ``--model``
    is reported by the command, not in a replica's log. Joins the cluster in ``RAY_ADDRESS``, or a
    Ray this process already started, or starts a local one.
    """
    exposure = cfg.unauthenticated_exposure()
    if exposure is not None:
        raise UserError(f"refusing to serve: {exposure}")
    log.info("checking the model %s", cfg.model)
    check_model(cfg.model, cfg.resolution)  # the replicas load the weights; the driver checks the files

    import ray
    from ray import serve

    from pipelines.serve.app import build_app

    address = os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():  # a caller (recompose quickstart) may have started it already
        log.info("starting Ray (%s)", "joining " + address if address else "local")
        ray.init(address=address or None, logging_level="WARNING", log_to_driver=False)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    log.info(
        "deploying %s: model x%d (%s CPU, %s GPU), batching %s",
        cfg.name,
        cfg.model_deployment.num_replicas,
        cfg.model_deployment.num_cpus,
        cfg.model_deployment.num_gpus,
        "on" if cfg.batching.enabled else "off",
    )
    t = time.perf_counter()
    serve.run(build_app(cfg), name=cfg.name, route_prefix=cfg.route_prefix)
    base = f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}/"
    log.info("ready in %.1fs", time.perf_counter() - t)
    log.info("web page   %s", base)
    log.info("API docs   %sdocs   (OpenAPI: %sopenapi.json)", base, base)
    log.info(
        "endpoints  POST %sv1/generate, %sv1/edit, %sv1/decompose; GET %sv1/model, %shealthz",
        base,
        base,
        base,
        base,
        base,
    )
    return base


def block() -> None:
    """Serve until Ctrl-C, then shut the app down."""
    from ray import serve

    log.info("serving; Ctrl-C stops")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("stopping")
        serve.shutdown()
