from berth.store.refs import ModelRef, parse_ref
from berth.store.store import ModelStore, StoreEntry, StoreError

__all__ = ["ModelRef", "ModelStore", "StoreEntry", "StoreError", "parse_ref"]
