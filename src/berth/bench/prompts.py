"""The prompts `berth bench` sends when given neither --prompt nor --prompt-file.

Short questions measure time to first token and per-request overhead; long
ones (several hundred tokens of context) make prefill part of every request,
as chat with history or retrieval does. Requests take them in turn.
"""

from __future__ import annotations

SHORT = (
    "Name three colors.",
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "Give me a word that rhymes with light.",
)

_REPORT = (
    "The maintenance log for the coastal weather station covers the last quarter. In the first month the "
    "anemometer bearings were replaced after readings drifted low by about eight percent during strong "
    "westerly winds. The replacement was calibrated against the portable reference unit, and the two agreed "
    "within one percent from calm conditions up to gusts of forty knots. In the second month a storm flooded "
    "the equipment shelter; the data logger survived because it sits on the upper shelf, but the backup "
    "battery bank was submerged and had to be replaced, and two days of humidity data were lost while the "
    "shelter dried out. The team added a drainage channel and raised the battery rack by thirty centimetres. "
    "In the third month the solar panel output fell by a fifth. Inspection found salt crust on the panel "
    "surface and a loose connector in the junction box; after cleaning and re-crimping the connector the "
    "output returned to its expected level. The station now sends a daily health report with battery "
    "voltage, panel current, shelter temperature and the number of missing readings, so problems show up "
    "within a day instead of at the next site visit. "
)

LONG = (
    _REPORT + "\n\nSummarise this log in three bullet points.",
    _REPORT + "\n\nWhich problem caused data to be lost, and what was changed so it does not happen again?",
    _REPORT * 2 + "\n\nList every part that was replaced or repaired, one per line.",
)

BUILT_IN = [prompt for pair in zip(SHORT, LONG + LONG[:1]) for prompt in pair]
