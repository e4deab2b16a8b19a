"""Device drivers for Lifeline Edge Agent.

This package is a leaf: it never imports :mod:`agent`. Each driver has its config models
(pydantic, used where a config is checked: ``drivers/modbus/config.py``,
``drivers/serial_config.py``, ``drivers/seismic_config.py``) apart from the code that
polls or reads, which never imports pydantic: the running agent gets its config as plain
twins of the models (:mod:`drivers.plain`) and tells device kinds apart by their
``driver`` (:mod:`drivers.kinds`).
"""
