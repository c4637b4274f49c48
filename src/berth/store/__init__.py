from berth.store.store import ModelStore, StoreEntry, StoreError

__all__ = ["ModelStore", "StoreEntry", "StoreError"]
