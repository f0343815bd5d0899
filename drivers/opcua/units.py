"""Engineering units: OPC UA ``EUInformation`` -> UCUM codes.

An AnalogItem's ``EngineeringUnits`` property is an ``EUInformation``: a
``NamespaceUri`` (normally the UNECE one below), a ``UnitId`` that packs the
UNECE Recommendation 20 common code (``"CEL"`` -> ``0x43454C``), a
``DisplayName`` (``"°C"``) and a ``Description`` (``"degree Celsius"``).

:func:`ucum_from_eu` tries, in order: the UNECE code, the display name, the
description. The first that appears in the tables below wins; otherwise it
returns ``""`` (no UCUM code known: the tag's ``unit`` must be set in the
config). Symbols are matched exactly (``mS`` and ``ms`` differ); descriptions
case-insensitively.
"""

from __future__ import annotations

from typing import Final

UNECE_NAMESPACE: Final = "http://www.opcfoundation.org/UA/units/un/cefact"

# (UNECE common code, UCUM code, UNECE symbol, UNECE description). The symbol
# and description are those of the OPC Foundation's UNECE_to_OPCUA.csv, so a
# server that fills DisplayName/Description from that table is matched even
# when it leaves UnitId at -1.
_UNECE: Final[tuple[tuple[str, str, str, str], ...]] = (
    # temperature
    ("CEL", "Cel", "°C", "degree Celsius"),
    ("FAH", "[degF]", "°F", "degree Fahrenheit"),
    ("KEL", "K", "K", "kelvin"),
    # dimensionless
    ("P1", "%", "%", "percent"),
    ("C62", "1", "1", "one"),
    ("59", "[ppm]", "ppm", "part per million"),
    ("Q30", "[pH]", "pH", "pH (potential of Hydrogen)"),
    # concentration
    ("GL", "g/L", "g/l", "gram per litre"),
    ("M1", "mg/L", "mg/l", "milligram per litre"),
    ("H29", "ug/L", "µg/l", "microgram per litre"),
    ("GJ", "g/mL", "g/ml", "gram per millilitre"),
    ("KMQ", "kg/m3", "kg/m³", "kilogram per cubic metre"),
    ("C38", "mol/L", "mol/l", "mole per litre"),
    ("M33", "mmol/L", "mmol/l", "millimole per litre"),
    ("C34", "mol", "mol", "mole"),
    ("C18", "mmol", "mmol", "millimole"),
    ("FH", "umol", "µmol", "micromole"),
    # volume
    ("LTR", "L", "l", "litre"),
    ("MLT", "mL", "ml", "millilitre"),
    ("4G", "uL", "µl", "microlitre"),
    ("DLT", "dL", "dl", "decilitre"),
    ("MTQ", "m3", "m³", "cubic metre"),
    ("CMQ", "cm3", "cm³", "cubic centimetre"),
    # volume flow
    ("L2", "L/min", "l/min", "litre per minute"),
    ("G51", "L/s", "l/s", "litre per second"),
    ("LD", "L/d", "l/d", "litre per day"),
    ("41", "mL/min", "ml/min", "millilitre per minute"),
    ("40", "mL/s", "ml/s", "millilitre per second"),
    ("G55", "mL/h", "ml/h", "millilitre per hour"),
    ("G54", "mL/d", "ml/d", "millilitre per day"),
    ("G49", "cm3/min", "cm³/min", "cubic centimetre per minute"),
    ("MQH", "m3/h", "m³/h", "cubic metre per hour"),
    ("MQS", "m3/s", "m³/s", "cubic metre per second"),
    # mass and mass flow
    ("KGM", "kg", "kg", "kilogram"),
    ("GRM", "g", "g", "gram"),
    ("MGM", "mg", "mg", "milligram"),
    ("MC", "ug", "µg", "microgram"),
    ("KGS", "kg/s", "kg/s", "kilogram per second"),
    ("E93", "kg/h", "kg/h", "kilogram per hour"),
    ("F28", "g/min", "g/min", "gram per minute"),
    ("F27", "g/h", "g/h", "gram per hour"),
    # rotation and frequency
    ("RPM", "/min", "r/min", "revolutions per minute"),
    ("M46", "/min", "r/min", "revolution per minute"),
    ("C94", "/min", "min⁻¹", "reciprocal minute"),
    ("RPS", "/s", "r/s", "revolutions per second"),
    ("C97", "/s", "s⁻¹", "reciprocal second"),
    ("H10", "/h", "1/h", "reciprocal hour"),
    ("HTZ", "Hz", "Hz", "hertz"),
    ("KHZ", "kHz", "kHz", "kilohertz"),
    # time
    ("SEC", "s", "s", "second [unit of time]"),
    ("C26", "ms", "ms", "millisecond"),
    ("MIN", "min", "min", "minute [unit of time]"),
    ("HUR", "h", "h", "hour"),
    ("DAY", "d", "d", "day"),
    # length and speed
    ("MTR", "m", "m", "metre"),
    ("CMT", "cm", "cm", "centimetre"),
    ("MMT", "mm", "mm", "millimetre"),
    ("4H", "um", "µm", "micrometre (micron)"),
    ("MTS", "m/s", "m/s", "metre per second"),
    # pressure
    ("PAL", "Pa", "Pa", "pascal"),
    ("KPA", "kPa", "kPa", "kilopascal"),
    ("A97", "hPa", "hPa", "hectopascal"),
    ("MPA", "MPa", "MPa", "megapascal"),
    ("BAR", "bar", "bar", "bar [unit of pressure]"),
    ("MBR", "mbar", "mbar", "millibar"),
    ("ATM", "atm", "atm", "standard atmosphere"),
    ("PS", "[psi]", "lbf/in²", "pound-force per square inch"),
    ("HN", "mm[Hg]", "mm Hg", "conventional millimetre of mercury"),
    # electrical
    ("VLT", "V", "V", "volt"),
    ("2Z", "mV", "mV", "millivolt"),
    ("AMP", "A", "A", "ampere"),
    ("4K", "mA", "mA", "milliampere"),
    ("WTT", "W", "W", "watt"),
    ("KWT", "kW", "kW", "kilowatt"),
    ("C31", "mW", "mW", "milliwatt"),
    ("KWH", "kW.h", "kW·h", "kilowatt hour"),
    ("OHM", "Ohm", "Ω", "ohm"),
    ("SIE", "S", "S", "siemens"),
    ("C27", "mS", "mS", "millisiemens"),
    ("B99", "uS", "µS", "microsiemens"),
    ("D10", "S/m", "S/m", "siemens per metre"),
    ("H43", "S/cm", "S/cm", "siemens per centimetre"),
    ("H61", "mS/cm", "mS/cm", "millisiemens per centimetre"),
    ("G42", "uS/cm", "µS/cm", "microsiemens per centimetre"),
    # mechanics and viscosity
    ("NEW", "N", "N", "newton"),
    ("NU", "N.m", "N·m", "newton metre"),
    ("C65", "Pa.s", "Pa·s", "pascal second"),
    ("C24", "mPa.s", "mPa·s", "millipascal second"),
    ("C7", "cP", "cP", "centipoise"),
    ("DD", "deg", "°", "degree [unit of angle]"),
)

UCUM_BY_CODE: Final[dict[str, str]] = {code: ucum for code, ucum, _, _ in _UNECE}

# Display names as servers write them (beyond the UNECE symbols above).
_DISPLAY_ALIASES: Final[dict[str, str]] = {
    "℃": "Cel",
    "degC": "Cel",
    "deg C": "Cel",
    "°F": "[degF]",
    "degF": "[degF]",
    "g/L": "g/L",
    "mg/L": "mg/L",
    "µg/L": "ug/L",
    "μg/L": "ug/L",
    "ug/L": "ug/L",
    "mmol/L": "mmol/L",
    "mM": "mmol/L",
    "mol/L": "mol/L",
    "L": "L",
    "mL": "mL",
    "µL": "uL",
    "μL": "uL",
    "uL": "uL",
    "L/min": "L/min",
    "lpm": "L/min",
    "LPM": "L/min",
    "mL/min": "mL/min",
    "L/h": "L/h",
    "l/h": "L/h",
    "mL/h": "mL/h",
    "m3/h": "m3/h",
    "rpm": "/min",
    "RPM": "/min",
    "Rpm": "/min",
    "1/min": "/min",
    "/min": "/min",
    "U/min": "/min",
    "1/s": "/s",
    "/s": "/s",
    "sec": "s",
    "hr": "h",
    "μg": "ug",
    "ug": "ug",
    "μm": "um",
    "um": "um",
    "psi": "[psi]",
    "mmHg": "mm[Hg]",
    "Ohm": "Ohm",
    "ohm": "Ohm",
    "µS/cm": "uS/cm",
    "μS/cm": "uS/cm",
    "uS/cm": "uS/cm",
    "% sat": "%",
    "%sat": "%",
    "% air sat": "%",
    "%DO": "%",
    "mOsm/kg": "mosm/kg",
    "mosm/kg": "mosm/kg",
    "cells/mL": "/mL",
    "cells/ml": "/mL",
    "1e6 cells/mL": "10*6/mL",
    "1E6 cells/mL": "10*6/mL",
    "E6 cells/mL": "10*6/mL",
    "10^6 cells/mL": "10*6/mL",
    "10^6 cells/ml": "10*6/mL",
    "x10^6 cells/mL": "10*6/mL",
    "×10^6 cells/mL": "10*6/mL",
    "10⁶ cells/mL": "10*6/mL",
    "×10⁶ cells/mL": "10*6/mL",
    "Mcells/mL": "10*6/mL",
    "10^6/mL": "10*6/mL",
    "1e6/mL": "10*6/mL",
    "10*6/mL": "10*6/mL",
    "mS/cm": "mS/cm",
}

_BY_SYMBOL: Final[dict[str, str]] = {sym: ucum for _, ucum, sym, _ in _UNECE if sym}
_BY_SYMBOL.update(_DISPLAY_ALIASES)
# A UCUM code used as a display name is taken as it is.
_BY_SYMBOL.update({ucum: ucum for _, ucum, _, _ in _UNECE})

_BY_DESCRIPTION: Final[dict[str, str]] = {desc.lower(): ucum for _, ucum, _, desc in _UNECE}
_BY_DESCRIPTION.update(
    {
        "degrees celsius": "Cel",
        "revolutions per minute": "/min",
        "revolution per minute": "/min",
        "liter": "L",
        "liters": "L",
        "litres": "L",
        "milliliter": "mL",
        "milliliters": "mL",
        "millilitres": "mL",
        "liter per minute": "L/min",
        "liters per minute": "L/min",
        "litres per minute": "L/min",
        "milliliter per minute": "mL/min",
        "milliliters per minute": "mL/min",
        "millilitres per minute": "mL/min",
        "gram per liter": "g/L",
        "grams per liter": "g/L",
        "grams per litre": "g/L",
        "milligram per liter": "mg/L",
        "millimole per liter": "mmol/L",
        "percentage": "%",
    }
)


def unece_code(unit_id: int) -> str | None:
    """The UNECE common code packed in an EUInformation ``UnitId`` (Part 8, 5.6.3).

    ``0x43454C`` -> ``"CEL"``; None for -1/0 (no code) or bytes that are not
    upper-case letters and digits.
    """
    if unit_id <= 0 or unit_id > 0xFFFFFFFF:
        return None
    raw = unit_id.to_bytes(4, "big").lstrip(b"\0")
    try:
        code = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    if not code or not all(c.isdigit() or "A" <= c <= "Z" for c in code):
        return None
    return code


def unit_id(code: str) -> int:
    """The ``UnitId`` of a UNECE common code (``"CEL"`` -> 4408652)."""
    value = 0
    for ch in code:
        value = (value << 8) | ord(ch)
    return value


def ucum_from_display(text: str) -> str:
    """UCUM code for a unit written as a symbol or a name; ``""`` when unknown."""
    text = text.strip()
    if not text:
        return ""
    found = _BY_SYMBOL.get(text)
    if found is not None:
        return found
    return _BY_DESCRIPTION.get(text.lower(), "")


def ucum_from_eu(
    unit_id: int | None,
    display_name: str | None = None,
    description: str | None = None,
    namespace_uri: str | None = None,
) -> str:
    """UCUM code for an ``EUInformation``; ``""`` when no mapping is known.

    The UnitId is read as a UNECE code only when the namespace is UNECE's
    (or not given); other namespaces fall through to the names.
    """
    if unit_id is not None and namespace_uri in (None, "", UNECE_NAMESPACE):
        code = unece_code(unit_id)
        if code is not None and code in UCUM_BY_CODE:
            return UCUM_BY_CODE[code]
    for text in (display_name, description):
        if text:
            found = ucum_from_display(text)
            if found:
                return found
    return ""
