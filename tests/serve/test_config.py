"""Serve config, Serve config files, the request validation helpers and the CLI's refusals
(fast: no Ray cluster; the app itself is tested over HTTP in test_serve.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from jobs.serve import main as serve_main
from pipelines.config import ConfigError, from_dict, load_config
from pipelines.serve.api import ApiError, GenerateBody, validation_error
from pipelines.serve.config import ServeConfig
from pipelines.serve.decoding import guidance_text

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "values, message",
    [
        ({"model": ""}, "model must not be empty"),
        ({"model": "m", "port": 0}, "port"),
        ({"model": "m", "route_prefix": "api"}, "route_prefix"),
        ({"model": "m", "default_steps": 500}, "default_steps"),
        ({"model": "m", "model_deployment": {"min_replicas": 3, "max_replicas": 2}}, "min_replicas"),
        ({"model": "m", "model_deployment": {"max_queued_requests": 0}}, "max_queued_requests"),
        ({"model": "m", "batching": {"max_batch_size": 0}}, "max_batch_size"),
        ({"model": "m", "backpressure": {"status_code": 500}}, "503"),
        ({"model": "m", "limits": {"max_steps": 0}}, "limits"),
        ({"model": "m", "colour": 1}, "unknown config key"),
    ],
)
def test_bad_serve_configs_are_refused_by_name(values, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(ServeConfig, values)


def test_config_files_are_valid():
    from ray.serve.schema import ServeDeploySchema

    cfg = load_config(ServeConfig, ROOT / "configs/serve-gpu-cluster.yaml", {"model": "models:/recompose/1"})
    assert cfg.model_deployment.num_gpus == 1 and cfg.auth.token_env == "RECOMPOSE_API_TOKEN"
    serve_yaml = yaml.safe_load((ROOT / "infra/serve.yaml").read_text())
    ServeDeploySchema.model_validate(serve_yaml)
    app = serve_yaml["applications"][0]
    assert app["import_path"] == "pipelines.serve.app:app_builder"
    assert serve_yaml["http_options"]["host"] == "127.0.0.1"
    service = yaml.safe_load((ROOT / "infra/rayservice.yaml").read_text())
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    embedded = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    assert embedded.applications[0].import_path == app["import_path"]
    # The operator reaches the dashboard through the head Service, so it listens on the pod IP;
    # what keeps it private is a ClusterIP Service and Ray's token authentication.
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert cluster["authOptions"]["mode"] == "token"


def test_app_builder_takes_the_serve_config_args(tiny_model_dir):
    from pipelines.serve.app import app_builder

    serve_yaml = yaml.safe_load((ROOT / "infra/serve.yaml").read_text())
    args = {**serve_yaml["applications"][0]["args"], "model": tiny_model_dir}
    app = app_builder(args)  # builds the bound application; nothing is deployed
    assert type(app).__name__ == "Application"
    with pytest.raises(ConfigError, match="unknown config key"):
        app_builder({"model": tiny_model_dir, "batching": {"size": 3}})
    cluster = app_builder({"config": str(ROOT / "configs/serve-gpu-cluster.yaml"), "model": tiny_model_dir})
    assert type(cluster).__name__ == "Application"


def test_cli_refuses_bad_models_and_configs(tmp_path, capsys):
    assert serve_main(["--model", str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert serve_main(["--model", str(tmp_path), "--set", "port=99999"]) == 2
    assert "port" in capsys.readouterr().err
    (tmp_path / "x").mkdir()
    assert serve_main(["--model", str(tmp_path / "x")]) == 2
    assert "model_index.json" in capsys.readouterr().err


def test_guidance_forms_and_validation_errors():
    assert guidance_text(3, "g") == "3"
    assert guidance_text("text=5,sketch=2", "g") == "text=5,sketch=2"
    assert guidance_text({"text": 5, "sketch": 2}, "g") == "text=5.0,sketch=2.0"
    for bad in ({}, {"text": "high"}, True):
        with pytest.raises(ApiError) as e:
            guidance_text(bad, "g")
        assert e.value.status == 422 and e.value.code == "invalid_guidance"
    from pydantic import ValidationError

    for body, status, code in [
        ('{"conditions": {"colour": {}}}', 422, "unknown_condition"),
        ('{"nope": 1}', 422, "unknown_field"),
        ('{"steps": "many"}', 422, "invalid_request"),
        ("{", 400, "invalid_json"),
    ]:
        with pytest.raises(ValidationError) as e:
            GenerateBody.model_validate_json(body)
        err = validation_error(list(e.value.errors()))
        assert (err.status, err.code) == (status, code), body


def test_build_app_maps_the_config_to_deployment_options(tiny_model_dir):
    from pipelines.serve.app import build_app

    cfg = from_dict(
        ServeConfig,
        {
            "model": tiny_model_dir,
            "model_deployment": {
                "autoscaling": True,
                "min_replicas": 1,
                "max_replicas": 3,
                "target_ongoing_requests": 5,
                "num_cpus": 2,
                "num_gpus": 1,
                "max_ongoing_requests": 24,
                "max_queued_requests": 7,
            },
            "ingress": {"num_replicas": 2, "num_cpus": 0.5},
        },
    )
    ingress = build_app(cfg)._bound_deployment
    model = ingress.init_args[0]._bound_deployment
    assert (ingress.name, ingress.num_replicas, ingress.ray_actor_options["num_cpus"]) == ("Ingress", 2, 0.5)
    assert model.name == "ComposerServer"
    assert model.ray_actor_options["num_gpus"] == 1 and model.ray_actor_options["num_cpus"] == 2
    dc = model._deployment_config
    assert (dc.max_ongoing_requests, dc.max_queued_requests) == (24, 7)
    auto = dc.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 3, 5)
    fixed = build_app(
        from_dict(ServeConfig, {"model": tiny_model_dir, "model_deployment": {"num_replicas": 3}})
    )
    assert fixed._bound_deployment.init_args[0]._bound_deployment.num_replicas == 3


def test_the_driver_checks_a_cascade_and_its_resolution(tmp_path, capsys):
    """``check_model`` (what ``recompose serve`` runs before deploying): a cascade directory is a
    model, ``--resolution`` must be one of its stages' sides, an upsampler alone is refused."""
    from pipelines.diffusion.loading import ModelError, check_model
    from tests.helpers.cascade import make_cascade

    cascade = make_cascade(tmp_path)
    assert check_model(str(cascade)) == [16, 32] and check_model(str(cascade), 16) == [16]
    assert check_model(str(tmp_path / "base")) == [16]
    with pytest.raises(ModelError, match="makes 16, 32 px"):
        check_model(str(cascade), 24)
    with pytest.raises(ModelError, match="is an upsampler"):
        check_model(str(tmp_path / "upsampler"))
    assert serve_main(["--model", str(cascade), "--resolution", "24"]) == 2
    assert "--resolution 24" in capsys.readouterr().err
