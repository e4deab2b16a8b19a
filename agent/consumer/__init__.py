"""The reference consumer of the platform side (``edge-agent consume``, ``docs/platform.md``).

It takes the gateways' messages from an MQTT broker (optionally one shared subscription
among several consumer processes) or from a RabbitMQ queue, decodes and validates each
against the contract's JSON Schemas (:mod:`agent.consumer.decode`), deduplicates on
(gateway, seq), applies the gateways' clock re-stamp notices and reports the seqs that are
neither received nor covered by a ``dropped`` notice (:mod:`agent.consumer.ledger` in
memory, :mod:`agent.consumer.postgres` in a database shared by several consumers).

Needs the ``consumer`` extra (``pip install 'lifeline-edge-agent[consumer]'``). The agent
daemon never imports this package.
"""
