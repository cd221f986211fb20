"""PAPI data: items, split, subjects in raw coding, subject selection."""

from palign.data.papi import (
    CODINGS,
    Inventory,
    Item,
    PapiData,
    PapiDataError,
    Subject,
    keyed,
    load_papi,
    locate_papi,
    select_subjects,
)

__all__ = [
    "CODINGS",
    "Inventory",
    "Item",
    "PapiData",
    "PapiDataError",
    "Subject",
    "keyed",
    "load_papi",
    "locate_papi",
    "select_subjects",
]
