"""Who may do what (DESIGN.md §10, issue 11): callers, administrators, granted roots and limits.

Pure rules, no I/O: the caller is an e-mail proven by a verified ID token (dicomflow.auth); whether a Drive
folder lies inside a root is decided by walking its parents (services/access.py). Here:

- an administrator sees and acts on every batch and watch; everyone else only on their own — a batch of
  someone else is answered exactly like a batch that does not exist (404), so its id reveals nothing;
- a submitter may use as source or destination only folders inside the roots granted to them or to a
  group they belong to; roots and limits are granted per user or group e-mail by an administrator;
- groups are a static map kept with the grants: ID tokens carry no group claims, and looking members up
  in Google Groups (Cloud Identity API) needs credentials and a network this project cannot test offline.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import PurePosixPath

from dicomflow.domain.failures import InvalidInput
from dicomflow.domain.locations import Location, LocationKind, parse_location


@dataclass(frozen=True, slots=True)
class Caller:
    """A verified identity: the token's e-mail, lower-cased (Google e-mails are case-insensitive)."""

    email: str
    admin: bool = False

    @property
    def owner(self) -> str:
        """What a batch or watch created by this caller records as its owner."""
        return self.email


@dataclass(frozen=True, slots=True)
class Limits:
    """Per submitter; 0 means no limit."""

    max_unfinished_batches: int = 0
    max_batch_files: int = 0
    max_batch_bytes: int = 0


@dataclass(frozen=True, slots=True)
class Grant:
    roots: tuple[Location, ...] = ()
    limits: tuple[tuple[str, int], ...] = ()  # overrides of the deployment's default limits, by name


@dataclass(frozen=True)
class AccessPolicy:
    admins: frozenset[str] = frozenset()
    grants: dict[str, Grant] = field(default_factory=dict)
    groups: dict[str, frozenset[str]] = field(default_factory=dict)
    default_limits: Limits = Limits()

    def principals(self, email: str) -> list[str]:
        """The e-mail itself and every group it belongs to (one level: groups of groups are not expanded)."""
        email = email.lower()
        return [email, *sorted(g for g, members in self.groups.items() if email in members)]

    def is_admin(self, email: str) -> bool:
        return any(p in self.admins for p in self.principals(email))

    def caller(self, email: str) -> Caller:
        return Caller(email.lower(), admin=self.is_admin(email))

    def roots(self, email: str) -> tuple[Location, ...]:
        found: list[Location] = []
        for principal in self.principals(email):
            for root in self.grants.get(principal, Grant()).roots:
                if root not in found:
                    found.append(root)
        return tuple(found)

    def limits(self, email: str) -> Limits:
        """The defaults, overridden by the user's own grant, else by the first of their groups' grants that
        sets that limit."""
        chosen = dict(asdict(self.default_limits))
        for principal in reversed(self.principals(email)):  # the user's own grant is applied last: it wins
            chosen.update(dict(self.grants.get(principal, Grant()).limits))
        return Limits(**chosen)


def can_see(caller: Caller, owner: str) -> bool:
    """Whether the caller may read or act on a batch or watch owned by `owner` ("" = nobody's)."""
    return caller.admin or (bool(owner) and owner == caller.email)


def local_path_inside(path: str, root: str) -> bool:
    """Whether an absolute, already resolved path lies inside (or is) an absolute, resolved root."""
    candidate, base = PurePosixPath(path), PurePosixPath(root)
    return candidate == base or base in candidate.parents


def describe_roots(roots: tuple[Location, ...]) -> str:
    return ", ".join(r.uri for r in roots) if roots else "none"


# --- parsing the administrator's configuration (config.py reads it; the rules live here) ----------------------


def _email(value: object, field_name: str) -> str:
    if not isinstance(value, str) or "@" not in value or any(c.isspace() for c in value):
        raise InvalidInput(f"{value!r} is not an e-mail address", field=field_name)
    return value.strip().lower()


def _count(raw: dict[str, object], name: str, field_name: str) -> int:
    value = raw.get(name, 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidInput(f"{name} must be a whole number >= 0", field=field_name)
    return value


def _root(value: object, field_name: str) -> Location:
    if not isinstance(value, str):
        raise InvalidInput("a root must be drive://FOLDER_ID or an absolute local path", field=field_name)
    location = parse_location(value, field=field_name)
    if location.kind is LocationKind.LOCAL and not location.ref.startswith("/"):
        raise InvalidInput("a local root must be an absolute path", field=field_name)
    return location


def parse_grants(raw: object, field_name: str) -> dict[str, Grant]:
    if not isinstance(raw, dict):
        raise InvalidInput("must be a JSON object of e-mail -> roots", field=field_name)
    grants: dict[str, Grant] = {}
    for principal, spec in raw.items():
        key = _email(principal, field_name)
        limits: tuple[tuple[str, int], ...] = ()
        roots = spec
        if isinstance(spec, dict):
            unknown = sorted(set(spec) - {"roots", *Limits.__dataclass_fields__})
            if unknown:
                raise InvalidInput(f"{key}: unknown key {unknown[0]!r}", field=field_name)
            given = sorted(n for n in set(spec) - {"roots"} if spec[n] is not None)  # null: the default
            limits = tuple((name, _count(spec, name, field_name)) for name in given)
            roots = spec.get("roots", [])
        if not isinstance(roots, list):
            raise InvalidInput(f"{key}: roots must be a list", field=field_name)
        grants[key] = Grant(tuple(_root(r, field_name) for r in roots), limits)
    return grants


def parse_groups(raw: object, field_name: str) -> dict[str, frozenset[str]]:
    if not isinstance(raw, dict):
        raise InvalidInput("must be a JSON object of group e-mail -> member e-mails", field=field_name)
    groups: dict[str, frozenset[str]] = {}
    for group, members in raw.items():
        if not isinstance(members, list):
            raise InvalidInput(f"{group}: members must be a list", field=field_name)
        groups[_email(group, field_name)] = frozenset(_email(m, field_name) for m in members)
    return groups
