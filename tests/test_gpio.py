"""GPIO outputs on gpiozero's MockFactory: what is on for which alarms, safe states, the
stall watchdog, the status LED and the technician's `gpio test`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from gpiozero.pins.mock import MockFactory

from agent.alarms import Alarm, AlarmState
from agent.cli import main
from agent.config.alarms import AlarmRule, GpioConfig, OutputConfig
from agent.gpio import Gpio, OutputState, desired_outputs
from tests.helpers import wait_until


@pytest.fixture
def pins() -> Iterator[MockFactory]:
    factory = MockFactory()
    yield factory
    factory.reset()


def alarm(rule_id: str, severity: str, state: str) -> Alarm:
    rule = AlarmRule.model_validate(
        {
            "id": rule_id,
            "device": "d",
            "point": "p",
            "kind": "high",
            "setpoint": 1,
            "severity": severity,
        }
    )
    return Alarm(rule, "d", None, AlarmState(state=state))


OUTPUTS = [
    OutputConfig.model_validate(o)
    for o in (
        {"name": "buzzer", "kind": "buzzer", "pin": 17, "severities": ["critical"]},
        {"name": "relay", "kind": "relay", "pin": 27, "rules": ["gas-drop"]},
        {
            "name": "light",
            "kind": "led",
            "pin": 22,
            "severities": ["warning", "critical"],
            "blink": {"warning": "1s"},
        },
    )
]


@pytest.mark.parametrize(
    ("alarms", "expected"),
    [
        ([], {"buzzer": (False, None), "relay": (False, None), "light": (False, None)}),
        (
            [("level-h", "warning", "active")],
            {"buzzer": (False, None), "relay": (False, None), "light": (True, 1.0)},
        ),
        (
            [("level-h", "warning", "active"), ("level-hh", "critical", "active")],
            {"buzzer": (True, None), "relay": (False, None), "light": (True, None)},
        ),
        (  # acknowledged: the buzzer stops, the light stays
            [("level-hh", "critical", "acked")],
            {"buzzer": (False, None), "relay": (False, None), "light": (True, None)},
        ),
        (  # cleared but not acknowledged: nothing is on any more
            [("level-hh", "critical", "cleared")],
            {"buzzer": (False, None), "relay": (False, None), "light": (False, None)},
        ),
        (  # the relay follows its rule whatever the severity
            [("gas-drop", "warning", "acked")],
            {"buzzer": (False, None), "relay": (True, None), "light": (True, 1.0)},
        ),
    ],
)
def test_desired_outputs(alarms: list[tuple[str, str, str]], expected: dict[str, Any]) -> None:
    got = desired_outputs(OUTPUTS, [alarm(*a) for a in alarms])
    assert {n: (s.on, s.blink) for n, s in got.items()} == expected


def test_start_state_safe_state_and_close(pins: MockFactory) -> None:
    outputs = [
        *OUTPUTS[:2],
        OutputConfig.model_validate(
            {
                "name": "fan",
                "kind": "relay",
                "pin": 5,
                "rules": ["x"],
                "safe_state": "on",
                "active_high": False,
            }
        ),
    ]
    g = Gpio(GpioConfig(), outputs, {"relay": OutputState(True)}, pin_factory=pins)
    assert g.factory_name == "MockFactory"
    assert [s.state for s in pins.pin(27).states] == [False, True], "straight to on"
    assert pins.pin(17).state is False, "buzzer starts in its safe state (off)"
    assert pins.pin(5).state is False, "fan: safe state on, active low = pin low"
    assert g.apply({"buzzer": OutputState(True)}) == ["buzzer"]
    assert g.apply({"buzzer": OutputState(True)}) == [], "only changes are written"
    g.close()
    assert pins.pin(17).state is False and pins.pin(27).state is False
    assert pins.pin(5).state is False


def test_stalled_evaluation_puts_outputs_in_safe_state(pins: MockFactory) -> None:
    g = Gpio(GpioConfig(stall_after="1s"), OUTPUTS, pin_factory=pins)
    g.apply({"buzzer": OutputState(True), "relay": OutputState(True)})
    assert pins.pin(17).state and pins.pin(27).state
    wait_until(lambda: not pins.pin(17).state and not pins.pin(27).state, 5, "safe state")
    g.apply({"buzzer": OutputState(True), "relay": OutputState(True)})
    assert pins.pin(17).state and pins.pin(27).state, "evaluation runs again: outputs follow"
    g.close()


def test_status_led_blinks_fast_without_uplink(pins: MockFactory) -> None:
    g = Gpio(GpioConfig.model_validate({"status_led": {"pin": 24}}), [], pin_factory=pins)

    def toggles(seconds: float) -> int:
        n = len(pins.pin(24).states)
        time.sleep(seconds)
        return len(pins.pin(24).states) - n

    g.set_status(uplink=False)
    fast = toggles(1.0)
    g.set_status(uplink=True)
    time.sleep(0.2)
    slow = toggles(1.0)
    g.close()
    assert fast >= 8, fast  # 0.1 s on, 0.1 s off
    assert slow <= 2, slow  # a 0.1 s blink every 2 s


def test_led_blinks_for_a_warning(pins: MockFactory) -> None:
    g = Gpio(GpioConfig(), OUTPUTS, pin_factory=pins)
    g.apply({"light": OutputState(True, 0.2)})
    n = len(pins.pin(22).states)
    time.sleep(0.6)
    assert len(pins.pin(22).states) - n >= 4
    g.apply({"light": OutputState(True)})
    time.sleep(0.1)
    n = len(pins.pin(22).states)
    time.sleep(0.3)
    assert len(pins.pin(22).states) == n and pins.pin(22).state, "steady on"
    g.close()


def test_gpio_test_command(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        "gateway_id: g\nstate_dir: st\n"
        "devices: [{id: d, host: h, points: [{name: v, address: 0}]}]\n"
        "alarms: [{id: v-h, device: d, point: v, kind: high, setpoint: 5}]\n"
        "outputs: [{name: siren, kind: buzzer, pin: GPIO17, rules: [v-h]}]\n"
        "gpio: {pin_factory: mock}\n"
    )
    result = CliRunner().invoke(main, ["gpio", "test", "-c", str(cfg), "siren", "--seconds", "0.1"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "pin factory MockFactory; output siren (buzzer) on pin GPIO17",
        "  on for 0.1s: pin reads on",
        "  back to its safe state (off)",
    ]
    bad = CliRunner().invoke(main, ["gpio", "test", "-c", str(cfg), "sirne"])
    assert bad.exit_code == 2 and "outputs: siren" in bad.output


def test_alarm_and_output_references_are_checked(tmp_path: Path) -> None:
    from agent.config.loader import ConfigError, load_config

    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        "gateway_id: g\nstate_dir: st\n"
        "devices: [{id: d, host: h, points: [{name: level, address: 0}]}]\n"
        "alarms:\n"
        "  - {id: a, device: dd, point: level, kind: high, setpoint: 5}\n"
        "  - {id: a, device: d, point: levle, kind: high, setpoint: 5}\n"
        "  - {id: c, profile: nobody, point: level, kind: stale, after: 5s}\n"
        "outputs:\n"
        "  - {name: siren, kind: buzzer, pin: GPIO17, rules: [b]}\n"
        "  - {name: lamp, kind: led, pin: 17, severities: [warning]}\n"
    )
    with pytest.raises(ConfigError) as exc:
        load_config(cfg)
    got = {(i.line, i.message) for i in exc.value.issues}
    assert got == {
        (5, "no device 'dd' (did you mean 'd'?)"),
        (6, "rule id 'a' is also used by alarms[0]"),
        (6, "device 'd' has no point 'levle' (did you mean 'level'?)"),
        (7, "no device uses profile 'nobody'"),
        (9, "no alarm rule 'b' (there are: a, c)"),
        (10, "pin 17 is also used by output 'siren'"),
    }, got
