"""The adapters' names: an utterance's `source`, and the key of the sink that answers it."""

from __future__ import annotations

# A source and its sink share one name, so neither needs to import the other.
MQTT = "mqtt"
HOMEASSISTANT = "homeassistant"
XIAOMI = "xiaomi"
# The status page's "ask" box.
WEB = "http"
