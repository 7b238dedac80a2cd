"""The operations layer: a node run from a config file (its pipelines,
reloading them), its metrics endpoint.

Imports only the layers below it: ``errors``, ``identity``, ``carriers``,
``session``, ``node``, ``channels``, ``tunnels`` and ``coordinator``.
"""

from .config import Config, ConfigError, load_config, parse_config, register_module
from .runtime import Pipeline, Runtime

__all__ = ["Config", "ConfigError", "load_config", "parse_config", "register_module", "Runtime", "Pipeline"]
