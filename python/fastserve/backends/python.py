"""Python models: ``model.py`` defines ``class Model`` with ``execute`` (and optional
``initialize``/``finalize``), as described in the README's Python model API."""

from __future__ import annotations

import importlib.util
import logging
import sys
from types import ModuleType

from . import LoadContext, LoadedModel, LoadError

log = logging.getLogger("fastserve.backends.python")


def _import(ctx: LoadContext) -> ModuleType:
    path = ctx.version_dir / "model.py"
    if not path.is_file():
        raise LoadError("model.py not found in the version directory")
    # A unique module name per model version, so versions never share module state.
    module_name = f"fastserve_models.{ctx.name}.v{ctx.version}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise LoadError("model.py cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(module_name, None)
        log.exception("importing model.py of model '%s' version %s failed", ctx.name, ctx.version)
        raise LoadError(f"model.py raised {type(e).__name__}: {e}") from None
    return module


def load(ctx: LoadContext) -> LoadedModel:
    cfg = ctx.config
    if not cfg.inputs or not cfg.outputs:
        raise LoadError("python models must declare [[input]] and [[output]] in config.toml")
    if cfg.instance_group.kind != "cpu":
        raise LoadError('python models run with [instance_group] kind = "cpu"')
    model_class = getattr(_import(ctx), "Model", None)
    if not isinstance(model_class, type):
        raise LoadError("model.py must define a class named Model")
    instances = []
    for index in range(cfg.instance_group.count):
        try:
            model = model_class()
            if not callable(getattr(model, "execute", None)):
                raise LoadError("class Model has no execute(inputs) method")
            initialize = getattr(model, "initialize", None)
            if callable(initialize):
                initialize(ctx.initialize_args(index))
        except LoadError:
            raise
        except Exception as e:
            log.exception("initializing model '%s' version %s failed", ctx.name, ctx.version)
            raise LoadError(f"Model() or initialize() raised {type(e).__name__}: {e}") from None
        instances.append(model)
    return LoadedModel(
        platform="python",
        max_batch_size=cfg.max_batch_size or 0,
        inputs=list(cfg.inputs),
        outputs=list(cfg.outputs),
        instances=instances,
    )
