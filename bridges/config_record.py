"""Dataclass configs written into file metadata and read back: one to_dict / from_dict for all of them."""
from dataclasses import asdict, fields


class ConfigRecord:
    """Mixed into a dataclass: to_dict() is its fields; from_dict() builds it and refuses fields it does not have,
    by name (a file written by a newer version, or another model's), as ValueError. FIELDS_LABEL names them in the
    message."""
    FIELDS_LABEL = "config fields"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        if not isinstance(d, dict):
            raise ValueError(f"the {cls.FIELDS_LABEL} are a {type(d).__name__}, not an object")
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown {cls.FIELDS_LABEL} {sorted(unknown)}")
        return cls(**d)
