"""Renamed arguments: one mechanism, one message, one registry.

A renamed keyword keeps working for one release: the call goes through with
the value moved to its new name and a ``DeprecationWarning`` that names the
new one. Two kinds of rename:

* `renamed` — a keyword renamed in place (``hvp_mode`` -> ``mode``);
* `moved_to_solver` — a solver option that a function built on a Krylov
  algorithm used to re-expose (``track_curvature(tol=...)``); it moves into
  that function's solver value (``eigsh=curvlib.Eigsh(rtol=...)``).

Every rename is recorded in `RENAMES` (``where, old, new``): the tests
call each one and ``CHANGELOG.md`` must list each one. A wrapper calls the
function it wraps through its ``__wrapped__`` attribute, so a test can stand in
for the function and see the exact call each spelling makes.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import sys
import warnings
from typing import NamedTuple


class Rename(NamedTuple):
    """One deprecated keyword: ``where(old=...)`` is now ``where(new=...)``."""

    where: str  # the public function, e.g. "curvlib.eigsh"
    old: str
    new: str  # e.g. "rtol", or "eigsh=Eigsh(rtol=...)"


RENAMES: list[Rename] = []


class _NotGiven:
    def __repr__(self):
        return "<deprecated>"


NOT_GIVEN = _NotGiven()  # the default of a deprecated keyword in the advertised signature


def _signature(fn, olds):
    """``fn``'s signature with the deprecated keywords appended (keyword-only, not given).

    Tools that bind arguments by signature (``optax.inject_hyperparams``) keep
    accepting the old names for the release they are deprecated in.
    """
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    var_kw = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    params = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
    names = {p.name for p in params}
    params += [inspect.Parameter(o, inspect.Parameter.KEYWORD_ONLY, default=NOT_GIVEN)
               for o in olds if o not in names]
    return sig.replace(parameters=params + var_kw)


def _pop(kwargs, old):
    """``(given, value)`` of the deprecated keyword ``old``, removed from ``kwargs``."""
    if old not in kwargs:
        return False, None
    value = kwargs.pop(old)
    return value is not NOT_GIVEN, value

REMOVAL = "it will be removed in the next release"


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
# libraries that call curvlib on the user's behalf: `jax.jit` tracing a function,
# `optax.inject_hyperparams` building a transform, flax and chex wrappers
_CALLERS = ("jax", "jaxlib", "optax", "flax", "chex")


def _library_dirs() -> tuple[str, ...]:
    dirs = [_PACKAGE]
    for name in _CALLERS:
        module = sys.modules.get(name)
        path = getattr(module, "__file__", None)
        if path:
            dirs.append(os.path.dirname(os.path.abspath(path)) + os.sep)
    return tuple(dirs)


def _bootstrap(filename: str) -> bool:
    """A frame `warnings.warn` skips without counting it (the import machinery's)."""
    return "importlib" in filename and "_bootstrap" in filename


def deprecated(message: str) -> None:
    """Issue ``message`` as a ``DeprecationWarning`` at the first caller outside curvlib
    (`warn_user`)."""
    warn_user(message, DeprecationWarning)


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """Issue ``message`` as a ``category`` warning at the first caller outside curvlib.

    However many of curvlib's wrappers lie between (stacked rename decorators, a
    module ``__getattr__``, an alias calling its transform), and whichever library
    called curvlib on the user's behalf (``jax.jit`` tracing, ``optax.inject_hyperparams``),
    the warning names the user's line, which Python's default filters show for a script
    or notebook (``__main__``). The level is counted as `warnings.warn` counts it: the
    import machinery's frames (``from curvlib import x`` in a function) are not counted.
    """
    dirs = _library_dirs()
    frame, level = sys._getframe(0), 1
    while frame is not None:
        name = frame.f_code.co_filename
        if _bootstrap(name):
            frame = frame.f_back
            continue
        if not name.startswith(dirs):
            break
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def warn(where: str, old: str, new: str) -> None:
    """The one deprecation message: ```old` is deprecated in where(); use `new```."""
    deprecated(f"`{old}` is deprecated in {where}(): use `{new}` ({REMOVAL}).")


def warn_moved(where: str, old: str, arg: str, cls: str, field: str, keep: str = "") -> None:
    """The message for a solver option that moved into the solver value ``arg``.

    ``keep``: the options of ``where``'s own default solver value that differ
    from the class's defaults (``"rtol=0.5, "``), spelled before ``field``.
    """
    deprecated(f"`{old}` is deprecated in {where}(): pass it as the option `{field}` of the "
               f"solver value, `{arg}=curvlib.{cls}({keep}{field}=...)` ({REMOVAL}).")


def _own_default(fn, arg: str, cls, fields):
    """``fn``'s declared default for ``arg``, and per moved field its other fields that
    differ from ``cls()``'s, spelled ``"name=value, "``."""
    declared = inspect.signature(fn).parameters[arg].default
    if not isinstance(declared, cls):
        return None, dict.fromkeys(fields, "")
    return declared, {field: _spelled(declared, cls, (field,)) for field in fields}


def _spelled(value, cls, skip) -> str:
    """The fields of the solver ``value`` that differ from ``cls()``'s, but ``skip``,
    spelled ``"name=value, "`` (what a call must keep when it adds an option to it)."""
    plain = cls()
    return "".join(f"{f.name}={getattr(value, f.name)!r}, " for f in dataclasses.fields(cls)
                   if f.name not in skip and _differ(getattr(value, f.name),
                                                     getattr(plain, f.name)))


class ArgumentConflict(TypeError, ValueError):
    """An argument given twice, under its old and its new spelling.

    A ``TypeError`` as Python's own "got multiple values for argument", and a
    ``ValueError`` as curvlib raised before.
    """


def _both(where: str, old: str, new: str):
    return ArgumentConflict(
        f"{where}() got both `{old}` and its new name `{new}`: pass `{new}` only."
    )


def _differ(a, b) -> bool:
    """Whether two option values are known to differ (traced values are not known to)."""
    if a is b:
        return False
    try:
        return bool(a != b)
    except Exception:  # noqa: BLE001 (a traced or array comparison: not known)
        return False


def _positional(fn, args) -> set:
    """The parameter names of ``fn`` that the positional ``args`` fill."""
    try:
        return set(inspect.signature(fn).bind_partial(*args).arguments)
    except TypeError:
        return set()


def renamed(where: str, **old_to_new: str):
    """Decorator: keywords ``old`` of ``where`` are accepted as ``new`` with a warning.

    Args:
      where: public name of the function (``"curvlib.eigsh"``), for the message.
      **old_to_new: ``old="new"`` pairs.

    Examples:
      >>> import warnings
      >>> from curvlib._deprecation import renamed
      >>> @renamed("f", tol="rtol")
      ... def f(*, rtol=1.0):
      ...     return rtol
      >>> with warnings.catch_warnings(record=True) as w:
      ...     warnings.simplefilter("always")
      ...     f(tol=0.5), str(w[0].message)
      (0.5, '`tol` is deprecated in f(): use `rtol` (it will be removed in the next release).')
    """
    for old, new in old_to_new.items():
        RENAMES.append(Rename(where, old, new))

    def deco(fn):
        defaults = {name: p.default for name, p in inspect.signature(fn).parameters.items()}

        @functools.wraps(fn)
        def call(*args, **kwargs):
            for old, new in old_to_new.items():
                given, value = _pop(kwargs, old)
                if given:
                    warn(where, old, new)
                    # the new name given too: by keyword with a value of its own (a tool
                    # binding the signature, `optax.inject_hyperparams`, passes its default),
                    # or by position
                    if (new in kwargs and _differ(kwargs[new], defaults.get(new, NOT_GIVEN))
                            or new in _positional(fn, args)):
                        raise _both(where, old, new)
                    kwargs[new] = value
            return call.__wrapped__(*args, **kwargs)  # `fn`, looked up so it can be observed

        call.__signature__ = _signature(fn, old_to_new)
        return call

    return deco


def moved_to_solver(where: str, arg: str, cls, static: tuple = (), **old_to_field: str):
    """Decorator: solver options ``old`` of ``where`` fold into its solver value ``arg``.

    ``where(old=x)`` becomes ``where(arg=dataclasses.replace(arg or default,
    field=x))``, ``default`` being ``where``'s own default solver value (or
    ``cls()``), with a warning naming the new spelling. An explicit ``arg`` value and an
    old option together are merged the same way (the old option wins, as it
    is the more specific), unless the value's own field was set to another value: then
    the option is given twice and the call raises `ArgumentConflict`.

    Args:
      where: public name of the function, for the message.
      arg: the keyword holding the solver value (``"eigsh"``, ``"cg"``).
      cls: the solver value type ([`curvlib.Eigsh`][curvlib.Eigsh], [`curvlib.CG`][curvlib.CG]).
      static: old keywords that ``where`` needs as Python ints (they fix a shape there),
        checked under their old name (`curvlib._validate.static_int`): a JAX array
        (``optax.inject_hyperparams`` makes one of a number) is refused naming the keyword
        that ``static_args`` must list.
      **old_to_field: ``old="field"`` pairs.
    """
    name = cls.__name__

    def deco(fn):
        declared, keep = _own_default(fn, arg, cls, old_to_field.values())
        for old, field in old_to_field.items():
            RENAMES.append(Rename(where, old, f"{arg}={name}({keep[field]}{field}=...)"))

        @functools.wraps(fn)
        def call(*args, **kwargs):
            given, olds = {}, {}
            # the solver value the call would have used: the one given (`inject_hyperparams`
            # passes the default explicitly), else ``fn``'s own default, else ``cls()``
            base = kwargs.get(arg)
            base = (cls() if declared is None else declared) if base is None else base
            moving = {field for old, field in old_to_field.items()
                      if kwargs.get(old, NOT_GIVEN) is not NOT_GIVEN}
            keep_now = _spelled(base, cls, moving) if isinstance(base, cls) else ""
            for old, field in old_to_field.items():
                was_given, value = _pop(kwargs, old)
                if was_given:
                    warn_moved(where, old, arg, name, field, keep_now)
                    if value is not None:
                        if old in static:  # (named as given: `static_args` lists it)
                            from curvlib import _validate  # noqa: PLC0415 (jax, lazily)
                            _validate.static_int(value, old, minimum=1)
                        add_option(given, olds, field, value, old, where, arg, name)
            if given:
                # merged into that value (``newton_cg``'s truncated CG keeps its ``rtol``)
                no_conflict(base, (cls(), declared or cls()), given, olds, where, arg, name)
                kwargs[arg] = dataclasses.replace(base, **given)
            return call.__wrapped__(*args, **kwargs)  # `fn` (see `renamed`)

        call.__signature__ = _signature(fn, old_to_field)
        return call

    return deco


def add_option(given: dict, olds: dict, field: str, value, old: str, where: str, arg: str,
               cls: str):
    """Record ``field = value`` from the old keyword ``old``; two values for one field raise."""
    if field in given and _differ(given[field], value):
        raise ArgumentConflict(
            f"{where}() got two values for `{field}` (`{olds[field]}` and `{old}`): pass "
            f"`{field}` once, as `{arg}=curvlib.{cls}({field}=...)`."
        )
    given[field], olds[field] = value, old


def no_conflict(base, references, given: dict, olds: dict, where: str, arg: str, cls: str):
    """Raise if the solver value ``base`` set a moved field (away from each of
    ``references``: the class's defaults, the function's own default value) to another
    value than its old keyword's."""
    for field, value in given.items():
        own = getattr(base, field)
        if all(_differ(own, getattr(r, field)) for r in references) and _differ(own, value):
            raise ArgumentConflict(
                f"{where}() got `{field}` twice: `{olds[field]}={value!r}` and "
                f"`{arg}=curvlib.{cls}({field}={own!r}, ...)`: pass it once, in `{arg}=`."
            )


# solver-value fields added after the options moved into the value: never an old keyword of
# a function, so neither folded nor listed as a rename
ADDED_FIELDS = frozenset({"verify"})


def _moved_fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.name not in ADDED_FIELDS]


def fold_options(where: str, arg: str, cls, value, options: dict, renames=None):
    """``(value, rest)``: the ``cls`` fields among ``options`` folded into ``value``, with warnings.

    For functions that used to forward ``**options`` to an algorithm: each
    option that is a field of ``cls`` (or an old name in ``renames``) moves
    into the solver value ``value`` (default ``cls()``) with a warning naming
    ``arg=curvlib.<cls>(field=...)``; the other options are returned as they came.
    """
    renames = dict(renames or {})
    fields = set(_moved_fields(cls))
    given, olds, rest = {}, {}, {}
    for name, v in options.items():
        field = renames.get(name, name)
        if field in fields:
            warn_moved(where, name, arg, cls.__name__, field)
            if v is not None:
                add_option(given, olds, field, v, name, where, arg, cls.__name__)
        else:
            rest[name] = v
    if given:
        base = cls() if value is None else value
        no_conflict(base, (cls(),), given, olds, where, arg, cls.__name__)
        value = dataclasses.replace(base, **given)
    return (cls() if value is None else value), rest


def register_folded(where: str, arg: str, cls, renames=None, exclude=()) -> None:
    """Record in `RENAMES` the options `fold_options` moves for ``where``.

    ``exclude``: fields whose keyword ``where`` gives another meaning (not folded).
    """
    for name in _moved_fields(cls):
        if name in exclude:
            continue
        RENAMES.append(Rename(where, name, f"{arg}={cls.__name__}({name}=...)"))
    for old, field in (renames or {}).items():
        RENAMES.append(Rename(where, old, f"{arg}={cls.__name__}({field}=...)"))
