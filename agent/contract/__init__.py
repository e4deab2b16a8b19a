"""The contract between the gateway and the city platform: every MQTT topic
(:mod:`agent.contract.topics`), every payload kind and its builder
(:mod:`agent.contract.payloads`, :mod:`agent.contract.telemetry`), and the JSON Schema of
each kind (:mod:`agent.contract.schemas`, written to ``docs/schemas/``). ``docs/mqtt.md``
describes it in prose.
"""
