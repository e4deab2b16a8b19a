"""Config models of strong-motion sensors (``driver: seismic``); the readers are
:mod:`drivers.seismic_stream`."""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from drivers.common import DisplayName, Duration, Name, StrictModel, at_least
from drivers.seismic_stream import LOOPBACK
from drivers.serial_config import LinePoint


class SeismicChannel(StrictModel):
    """One component: its name and counts → m/s² factor."""

    name: Name
    scale: float = Field(default=1.0, gt=0, description="m/s² per count")


class SeismicDevice(StrictModel):
    """A 1–3 component accelerometer streaming samples over a serial line."""

    driver: Literal["seismic"]
    id: Name
    name: DisplayName | None = Field(
        default=None, description="Text for people (any Unicode); in payloads, never in topics"
    )
    serial_port: str | None = Field(default=None, min_length=1, description="Serial source")
    udp_port: int | None = Field(
        default=None, ge=1, le=65535, description="Or: UDP port for Raspberry Shake datacast"
    )
    udp_senders: list[str] | None = Field(
        default=None,
        min_length=1,
        description="Addresses (IP or CIDR) datacast packets are taken from; default loopback",
    )
    udp_host: str = Field(
        default="127.0.0.1",
        description="Address to listen on for UDP (beyond loopback only with udp_senders)",
    )
    baudrate: int = Field(default=115200, ge=50, le=4_000_000)
    format: Literal["ascii", "datacast"] = Field(
        default="ascii", description="ascii ($SMP frames, serial) or datacast (UDP)"
    )
    sample_rate: float = Field(gt=0, le=2000, description="Samples per second per channel")
    channels: list[SeismicChannel] = Field(min_length=1, max_length=3)
    trigger_channel: Name | None = Field(
        default=None, description="STA/LTA runs on this channel (default: the first)"
    )
    sta: Annotated[Duration, at_least("10ms")] = 0.5
    lta: Annotated[Duration, at_least("1s")] = 10.0
    stalta: Literal["recursive", "classic"] = Field(
        default="recursive", description="STA/LTA variant (ObsPy's definitions)"
    )
    stalta_band: tuple[float, float] | None = Field(
        default=None,
        description="Band-pass (Hz) on the trigger channel before STA/LTA; default: raw counts",
    )
    trigger_on: float = Field(default=3.0, gt=0)
    trigger_off: float = Field(default=1.5, gt=0)
    bandpass: tuple[float, float] = Field(
        default=(0.1, 10.0), description="PGA/PGV band (Hz), GB/T 17742-2020 Appendix A"
    )
    pre_event: Annotated[Duration, at_least("0s")] = 5.0
    post_event: Annotated[Duration, at_least("0s")] = 10.0
    max_event: Annotated[Duration, at_least("1s")] = Field(
        default=120.0, description="Longest waveform excerpt kept for one event"
    )
    profile: None = None

    @field_validator("udp_senders")
    @classmethod
    def _senders(cls, value: list[str] | None) -> list[str] | None:
        for item in value or []:
            try:
                ipaddress.ip_network(item.strip(), strict=False)
            except ValueError:
                raise ValueError(
                    f"{item!r} is not an IP address or network: write e.g. 192.168.1.50 or "
                    "192.168.1.0/24"
                ) from None
        return value

    @field_validator("udp_host")
    @classmethod
    def _host(cls, value: str, info: Any) -> str:
        try:
            addr = ipaddress.ip_address("127.0.0.1" if value == "localhost" else value)
        except ValueError:
            raise ValueError(
                f"{value!r} is not an IP address of this gateway: write 127.0.0.1 (the "
                "default), an interface's address, or 0.0.0.0 for every interface"
            ) from None
        if not addr.is_loopback and info.data.get("udp_senders", []) is None:
            raise ValueError(
                f"listening on {value} takes packets from the network: name the sensors "
                "that may send with udp_senders, e.g. 'udp_senders: [192.168.1.50]' (an "
                "address or a network such as 192.168.1.0/24), or listen on 127.0.0.1"
            )
        return value

    @model_validator(mode="after")
    def _check(self) -> SeismicDevice:
        if (self.serial_port is None) == (self.udp_port is None):
            raise ValueError("give serial_port (with format ascii) or udp_port (datacast)")
        if (self.udp_port is not None) != (self.format == "datacast"):
            raise ValueError("UDP carries format datacast; a serial port format ascii")
        names = [c.name for c in self.channels]
        if len(set(names)) != len(names):
            raise ValueError("channel names must differ")
        if self.trigger_channel is not None and self.trigger_channel not in names:
            raise ValueError(f"trigger_channel {self.trigger_channel!r} is not one of {names}")
        if self.sta >= self.lta:
            raise ValueError("sta must be shorter than lta")
        if self.trigger_off > self.trigger_on:
            raise ValueError("trigger_off must not be above trigger_on")
        for key in ("bandpass", "stalta_band"):
            band = getattr(self, key)
            if band is not None and not 0 < band[0] < band[1] < self.sample_rate / 2:
                raise ValueError(
                    f"{key} {band[0]}–{band[1]} Hz must lie within 0–{self.sample_rate / 2} Hz"
                )
        return self

    __plain_computed__: ClassVar[tuple[str, ...]] = ("senders", "bus", "points")

    @property
    def senders(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        """The networks datacast packets are taken from (loopback unless ``udp_senders``)."""
        return [
            ipaddress.ip_network(n.strip(), strict=False) for n in (self.udp_senders or LOOPBACK)
        ]

    @property
    def bus(self) -> str:
        """The serial port or UDP endpoint it is read from."""
        if self.udp_port is not None:
            return f"udp:{self.udp_host}:{self.udp_port}"
        return f"serial:{self.serial_port}"

    @property
    def points(self) -> list[Any]:
        """The points of its 1 Hz summary (name and unit), for telemetry and alarm rules."""
        return [
            LinePoint(name=n, unit=u)
            for n, u in (
                ("pga", "m/s2"),
                ("pgv", "m/s"),
                ("intensity", None),
                ("sta_lta", None),
                ("noise", "m/s2"),
                ("gap_samples", None),
                ("invalid_samples", None),
            )
        ]
