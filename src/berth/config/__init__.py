from berth.config.loader import BerthConfig, GroupSpec, ModelSpec, load_config, parse_config

__all__ = ["BerthConfig", "GroupSpec", "ModelSpec", "load_config", "parse_config"]
