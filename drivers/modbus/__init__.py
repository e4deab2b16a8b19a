"""Modbus drivers (TCP now; RTU over RS-485 shares the same point model)."""
