"""`berth bench`: measure any OpenAI-compatible server (berth or not)."""
