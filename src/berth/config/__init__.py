from berth.config.loader import BerthConfig, GroupSpec, ModelSpec, RpcSpec, load_config, parse_config

__all__ = ["BerthConfig", "GroupSpec", "ModelSpec", "RpcSpec", "load_config", "parse_config"]
