"""Administration of projects and caller keys: the domain behind AdminService."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import re
from typing import Any

from icegate_server.access.keys import key_digest
from icegate_server.clock import Clock
from icegate_server.errors import AlreadyExistsError, InvalidFieldError, NotFoundError
from icegate_server.projects.records import (
    DEFAULT_PROJECT_ID,
    MAX_DISPLAY_NAME,
    UPDATABLE_PROJECT_FIELDS,
    ApiKey,
    Project,
    new_key_secret,
    validate_key_id,
    validate_project,
    validate_project_id,
)
from icegate_server.store import Store
from icegate_server.store.base import api_key_cursor, parse_api_key_cursor

MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100
"""Page sizes of ListProjects and ListApiKeys. A page of the largest keys (200-character
labels of 4-byte characters) stays near 1 MiB: a quarter of a client's receive limit."""
MAX_PAGE_TOKEN = 256
"""Longer than any page token this service issues (a ListApiKeys token has at most 196)."""
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9_-]+={0,2}")


@dataclasses.dataclass(frozen=True)
class ProjectDefaults:
    """What a new project gets for the fields its creator leaves unset (from settings)."""

    turn_ttl_default_seconds: int = 3600
    turn_ttl_max_seconds: int = 86400
    turn_ttl_min_seconds: int = 60


class ProjectAdmin:
    """Creates, reads, changes and deletes projects and caller keys."""

    def __init__(self, store: Store, clock: Clock, defaults: ProjectDefaults) -> None:
        self._store = store
        self._clock = clock
        self._defaults = defaults

    def _new_project(self, project_id: str, fields: dict[str, Any]) -> Project:
        unknown = set(fields) - UPDATABLE_PROJECT_FIELDS
        if unknown:
            raise InvalidFieldError(sorted(unknown)[0], "cannot be set")
        now = self._clock.now()
        base = {
            "turn_ttl_default_seconds": self._defaults.turn_ttl_default_seconds,
            "turn_ttl_max_seconds": self._defaults.turn_ttl_max_seconds,
        }
        project = Project(project_id=project_id, create_time=now, update_time=now,
                          **{**base, **fields})
        validate_project(project, turn_ttl_min=self._defaults.turn_ttl_min_seconds,
                         turn_ttl_max=self._defaults.turn_ttl_max_seconds)
        return project

    async def create_project(self, project_id: str, fields: dict[str, Any]) -> Project:
        """Creates a project; unset fields take the defaults.

        Raises:
            InvalidFieldError: A field breaks its rule.
            AlreadyExistsError: The id is taken.
        """
        project = self._new_project(project_id, fields)
        if not await self._store.create_project(project):
            raise AlreadyExistsError(f"project {project_id!r} exists already")
        return project

    async def ensure_default_project(self) -> None:
        """Creates the `default` project (where admin calls naming none act) if missing."""
        await self._store.create_project(self._new_project(DEFAULT_PROJECT_ID, {}))

    async def get_project(self, project_id: str) -> Project:
        validate_project_id(project_id)
        project = await self._store.get_project(project_id)
        if project is None:
            raise NotFoundError(f"project {project_id!r} does not exist")
        return project

    async def list_projects(self, page_size: int, page_token: str) -> tuple[list[Project], str]:
        """One page of projects and the token of the next ("" on the last page)."""
        if page_size < 0:
            raise InvalidFieldError("page_size", "must not be negative")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = _decode_page_token(page_token)
        projects = await self._store.list_projects(after=after, limit=size + 1)
        if len(projects) <= size:
            return projects, ""
        page = projects[:size]
        return page, base64.urlsafe_b64encode(page[-1].project_id.encode()).decode()

    async def update_project(self, project_id: str, changes: dict[str, Any]) -> Project:
        """Changes the named fields of a project.

        Raises:
            InvalidFieldError: No field named, a field that cannot change, or a bad value.
            NotFoundError: The project does not exist.
        """
        if not changes:
            raise InvalidFieldError("update_mask", "must name at least one field")
        unknown = set(changes) - UPDATABLE_PROJECT_FIELDS
        if unknown:
            raise InvalidFieldError("update_mask", f"cannot update {sorted(unknown)[0]!r}")
        current = await self.get_project(project_id)
        updated = dataclasses.replace(current, update_time=self._clock.now(), **changes)
        validate_project(updated, turn_ttl_min=self._defaults.turn_ttl_min_seconds,
                         turn_ttl_max=self._defaults.turn_ttl_max_seconds)
        if not await self._store.update_project(updated):
            raise NotFoundError(f"project {project_id!r} does not exist")
        return updated

    async def delete_project(self, project_id: str) -> None:
        validate_project_id(project_id)
        if not await self._store.delete_project(project_id, int(self._clock.now() * 1000)):
            raise NotFoundError(f"project {project_id!r} does not exist")

    async def create_api_key(self, project_id: str, *, admin: bool,
                             display_name: str) -> tuple[ApiKey, str]:
        """Creates a key; returns its record and its secret (shown once, never stored).

        Raises:
            InvalidFieldError: An admin key bound to a project, a project key without one,
                or a bad label.
            NotFoundError: The project does not exist.
        """
        if admin and project_id:
            raise InvalidFieldError("project_id", "must be empty for an admin key")
        if not admin:
            if not project_id:
                raise InvalidFieldError("project_id", "is required for a project key")
            await self.get_project(project_id)
        if len(display_name) > MAX_DISPLAY_NAME or not display_name.isprintable():
            raise InvalidFieldError("display_name",
                                    f"must be printable, at most {MAX_DISPLAY_NAME} characters")
        key_id, secret = new_key_secret()
        record = ApiKey(key_id=key_id, project_id=project_id, admin=admin,
                        display_name=display_name, create_time=self._clock.now(),
                        key_prefix=secret[:12])
        if not await self._store.create_api_key(record, key_digest(secret)):
            raise NotFoundError(f"project {project_id!r} does not exist")
        return record, secret

    async def list_api_keys(self, project_id: str, page_size: int,
                            page_token: str) -> tuple[list[ApiKey], str]:
        """One page of a project's keys (the admin keys for ""), oldest first, and the token
        of the next page ("" on the last).

        The token names the last key listed and the listing it belongs to: a token of
        another project's listing is refused, and keys created meanwhile appear on a later
        page when they sort after it.

        Raises:
            InvalidFieldError: A negative page size, or a page token this service did not
                issue for this listing.
            NotFoundError: The project does not exist.
        """
        if page_size < 0:
            raise InvalidFieldError("page_size", "must not be negative")
        if project_id:
            await self.get_project(project_id)
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = _decode_key_page_token(page_token, project_id)
        keys = await self._store.list_api_keys(project_id or None, after=after, limit=size + 1)
        if len(keys) <= size:
            return keys, ""
        page = keys[:size]
        token = f"{project_id}:{api_key_cursor(page[-1])}"
        return page, base64.urlsafe_b64encode(token.encode()).decode()

    async def revoke_api_key(self, key_id: str) -> ApiKey:
        validate_key_id(key_id)
        revoked = await self._store.revoke_api_key(key_id, int(self._clock.now() * 1000))
        if revoked is None:
            raise NotFoundError(f"API key {key_id!r} does not exist")
        return revoked


def _decode_key_page_token(token: str, project_id: str) -> str:
    """The store cursor in a ListApiKeys page token; refuses anything this service would not
    have issued for this listing (every byte of the token is checked: no padding, newline
    or character the decoder would otherwise skip)."""
    if not token:
        return ""
    refused = InvalidFieldError("page_token", "is not a token this service issued for "
                                "this listing")
    if len(token) > MAX_PAGE_TOKEN or not _TOKEN_CHARS.fullmatch(token):
        raise refused
    try:
        text = base64.urlsafe_b64decode(token.encode("ascii")).decode("ascii")
    except (binascii.Error, UnicodeError, ValueError):
        raise refused from None
    owner, _, cursor = text.partition(":")
    if (owner != project_id or parse_api_key_cursor(cursor) is None
            or base64.urlsafe_b64encode(text.encode()).decode() != token):
        raise refused
    return cursor


def _decode_page_token(token: str) -> str:
    if not token:
        return ""
    # Only the exact text this service issues: the decoder would skip a newline, a NUL or
    # any other character outside the alphabet, and accept a look-alike.
    refused = InvalidFieldError("page_token", "is not a token this service issued")
    if len(token) > MAX_PAGE_TOKEN or not _TOKEN_CHARS.fullmatch(token):
        raise refused
    try:
        after = base64.urlsafe_b64decode(token.encode("ascii")).decode("ascii")
    except (binascii.Error, UnicodeError, ValueError):
        raise refused from None
    if base64.urlsafe_b64encode(after.encode()).decode() != token:
        raise refused
    validate_project_id(after, field_name="page_token")
    return after
