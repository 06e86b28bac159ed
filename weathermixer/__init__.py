"""weathermixer: a framework-free WeatherMixer with exact Jigsaw model parallelism.

The public API of SPEC.md::

    import weathermixer as wm
    cfg = wm.Config(...)
    params = wm.init_params(cfg, seed=0, dtype="float64")
    y = wm.predict(params, x, cfg, rollout=1)
    loss, grads = wm.loss_and_grads(params, x, target, cfg, rollout=1)
    wm.save_checkpoint(path, params, cfg)
    params, cfg = wm.load_checkpoint(path)
"""
from weathermixer.config import Config
from weathermixer.io.checkpoint import load_checkpoint, save_checkpoint
from weathermixer.mixer.api import loss_and_grads, predict
from weathermixer.mixer.params import init_params

__all__ = ["Config", "init_params", "predict", "loss_and_grads", "save_checkpoint",
           "load_checkpoint"]
__version__ = "0.1.0"
