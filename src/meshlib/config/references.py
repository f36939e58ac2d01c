"""Checks across the policy that field validators cannot see: names that must exist."""

from __future__ import annotations

from meshlib.config.model import MeshConfig
from meshlib.config.source_yaml import LocatedDocument, Path
from meshlib.errors import PolicyIssue
from meshlib.resilience.policy import import_exception


def check_references(config: MeshConfig, document: LocatedDocument) -> list[PolicyIssue]:
    """Every destination, mirror and subset a route names must be defined."""
    issues: list[PolicyIssue] = []

    def target(path: Path, owner: str, service: str | None, subset: str | None) -> None:
        name = service or owner
        target_service = config.services.get(name)
        if target_service is None:
            known = ", ".join(sorted(config.services)) or "none"
            issues.append(
                document.issue((*path, "service"), f"unknown service {name!r} (known: {known})")
            )
            return
        if subset is not None and subset not in target_service.subsets:
            known = ", ".join(sorted(target_service.subsets)) or "none defined"
            issues.append(
                document.issue(
                    (*path, "subset"),
                    f"service {name!r} has no subset {subset!r} (its subsets: {known})",
                )
            )

    def exceptions(path: Path, names: list[str]) -> None:
        for index, dotted in enumerate(names):
            try:
                import_exception(dotted)
            except ValueError as exc:
                issues.append(document.issue((*path, "exceptions", index), str(exc)))

    if config.defaults.retries is not None:
        exceptions(("defaults", "retries"), config.defaults.retries.exceptions)
    for name, service in config.services.items():
        base: Path = ("services", name)
        if service.retries is not None:
            exceptions((*base, "retries"), service.retries.exceptions)
        for index, route in enumerate(service.routes):
            if route.retries is not None:
                exceptions((*base, "routes", index, "retries"), route.retries.exceptions)
        for index, route in enumerate(service.routes):
            route_path: Path = (*base, "routes", index)
            for dest_index, dest in enumerate(route.to):
                target((*route_path, "to", dest_index), name, dest.service, dest.subset)
            if route.mirror is not None:
                target((*route_path, "mirror"), name, route.mirror.service, route.mirror.subset)
            if route.rewrite is not None and route.rewrite.prefix is not None:
                path_match = route.match.path
                if path_match is None or path_match.prefix is None:
                    issues.append(
                        document.issue(
                            (*route_path, "rewrite", "prefix"),
                            "a prefix rewrite needs the route to match `path: {prefix: ...}`",
                        )
                    )
        for subset, selector in service.subsets.items():
            if not selector:
                issues.append(
                    document.issue(
                        (*base, "subsets", subset),
                        "an empty selector selects every endpoint: give at least one label",
                    )
                )
    return issues
