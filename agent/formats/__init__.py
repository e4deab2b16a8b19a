"""Output formats (``mqtt.format``) other than the native JSON contract, beside
``agent.sparkplug``: each turns what the agent publishes (native topic and JSON body, as
the buffer holds it) into the platform's own messages at the moment it goes to the MQTT
client (:class:`agent.mqtt.WireFormat`). The buffer, the seq accounting and the alarm path
know nothing of formats."""
