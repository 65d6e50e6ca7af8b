"""The public API of `import icegate`: complete `__all__`, and sync/async twins that match."""

from __future__ import annotations

import inspect

import pytest

import icegate
import icegate.errors
from icegate.aio import AsyncClient
from icegate.client import Client


def public_error_classes() -> list[type]:
    return [obj for name, obj in vars(icegate.errors).items()
            if not name.startswith("_") and inspect.isclass(obj)
            and obj.__module__ == icegate.errors.__name__
            and issubclass(obj, icegate.errors.IcegateError)]


def public_methods(cls: type) -> dict[str, inspect.Signature]:
    return {name: inspect.signature(member) for name, member in vars(cls).items()
            if callable(member) and not name.startswith("_")}


def test_error_discovery_finds_the_hierarchy():
    found = public_error_classes()
    assert icegate.errors.IcegateError in found
    assert icegate.errors.RateLimitedError in found


@pytest.mark.parametrize("cls", public_error_classes(), ids=lambda cls: cls.__name__)
def test_every_public_error_class_is_exported(cls):
    assert cls.__name__ in icegate.__all__
    assert getattr(icegate, cls.__name__) is cls


@pytest.mark.parametrize("name", ["Client", "AsyncClient", "rtc_ice_servers",
                                  "ConfigurationError", "FieldViolation", "QuotaUsage"])
def test_entry_points_are_exported(name):
    assert name in icegate.__all__


def test_every_name_in_all_resolves_once():
    assert len(icegate.__all__) == len(set(icegate.__all__))
    for name in icegate.__all__:
        assert getattr(icegate, name) is not None, name


def test_star_import_gives_exactly_all():
    namespace: dict[str, object] = {}
    exec("from icegate import *", namespace)  # noqa: S102 - the import under test
    namespace.pop("__builtins__")
    assert set(namespace) == set(icegate.__all__)


def test_sync_and_async_clients_have_the_same_methods():
    sync_methods = set(public_methods(Client))
    async_methods = set(public_methods(AsyncClient))
    assert sync_methods == async_methods
    assert {"issue_turn_credentials", "get_ice_servers", "health", "close"} <= sync_methods


@pytest.mark.parametrize("name", sorted(public_methods(Client)))
def test_twin_methods_take_the_same_parameters(name):
    sync_signature = public_methods(Client)[name]
    async_signature = public_methods(AsyncClient)[name]
    assert list(sync_signature.parameters) == list(async_signature.parameters)
    for parameter in sync_signature.parameters.values():
        twin = async_signature.parameters[parameter.name]
        assert twin.kind == parameter.kind, parameter.name
        assert twin.default == parameter.default, parameter.name


@pytest.mark.parametrize("name", sorted(public_methods(AsyncClient)))
def test_async_methods_are_awaitable(name):
    assert inspect.iscoroutinefunction(getattr(AsyncClient, name))


@pytest.mark.parametrize("name", sorted(set(public_methods(Client)) - {"close"}))
def test_every_call_takes_keyword_only_timeout_and_metadata(name):
    parameters = public_methods(Client)[name].parameters
    for option in ("timeout", "metadata"):
        assert parameters[option].kind is inspect.Parameter.KEYWORD_ONLY, option


def test_constructors_take_the_same_parameters():
    sync_parameters = inspect.signature(Client.__init__).parameters
    async_parameters = inspect.signature(AsyncClient.__init__).parameters
    assert list(sync_parameters) == list(async_parameters)
    for name, parameter in sync_parameters.items():
        assert async_parameters[name].kind == parameter.kind, name
        assert async_parameters[name].default == parameter.default, name
    assert sync_parameters["channel"].kind is inspect.Parameter.KEYWORD_ONLY
