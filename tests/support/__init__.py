"""Test harness: a real Mosquitto, subscribers and gateway runners."""
