"""Reading llama-server's `/slots` answer into KV cache use."""

from berth.runtime.gauges import KvUse, kv_use

SLOTS = [{"id": i, "n_ctx": 4096, "is_processing": i == 0, "n_prompt_tokens": 100, "next_token": [{"n_decoded": 5}]}
         for i in range(2)]


def test_only_busy_slots_count_and_separate_buffers_add_up():
    assert kv_use(SLOTS, ("llama-server", "-m", "m.gguf", "-np", "2")) == KvUse(used=105, capacity=8192)


def test_a_unified_buffer_that_every_slot_reports_is_counted_once():
    assert kv_use(SLOTS, ("llama-server", "-m", "m.gguf", "-np", "2", "--kv-unified")) == KvUse(105, 4096)


def test_an_answer_that_is_not_llama_servers_list_says_nothing():
    assert kv_use({"error": "not supported"}, ("llama-server",)) is None
    assert kv_use([{"id": 0}], ("llama-server",)) is None
    assert kv_use([], ("other-server",)) is None
