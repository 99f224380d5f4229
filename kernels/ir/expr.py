"""Integer index expressions over loop variables.

An expression is a linear combination of *atoms* plus a constant. An atom is a
loop variable (a ``str``) or a floor division / modulo of another expression by a
positive constant (what ``fuse`` produces). All loop variables are non-negative,
so C's ``/`` and ``%`` are floor division and modulo.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union


def _memo_hash(self) -> int:
    """Hash once: expressions nest (div/mod of sums) and are hashed in every dict merge."""
    h = self.__dict__.get("_hash")
    if h is None:
        h = hash(tuple(getattr(self, f) for f in self.__dataclass_fields__))
        object.__setattr__(self, "_hash", h)
    return h


@dataclass(frozen=True)
class DivMod:
    op: str  # "div" or "mod"
    arg: "Lin"
    divisor: int

    __hash__ = _memo_hash


Atom = Union[str, DivMod]


@dataclass(frozen=True)
class Lin:
    terms: tuple[tuple[Atom, int], ...] = ()
    const: int = 0

    __hash__ = _memo_hash

    # ------------------------------------------------------------ construction
    @staticmethod
    def var(name: str, coef: int = 1) -> "Lin":
        return Lin(((name, coef),))

    @staticmethod
    def constant(c: int) -> "Lin":
        return Lin((), c)

    def __add__(self, other: "Lin | int") -> "Lin":
        if isinstance(other, int):
            return Lin(self.terms, self.const + other)
        if not other.terms or not self.terms:  # common when composing indices
            return Lin(self.terms or other.terms, self.const + other.const)
        merged: dict[Atom, int] = dict(self.terms)
        for atom, coef in other.terms:
            merged[atom] = merged.get(atom, 0) + coef
        return _lin(merged, self.const + other.const)

    def __sub__(self, other: "Lin | int") -> "Lin":
        return self + (other * -1)

    def __mul__(self, k: int) -> "Lin":
        if k == 0:
            return Lin()
        return Lin(tuple((a, c * k) for a, c in self.terms), self.const * k)

    def floordiv(self, d: int) -> "Lin":
        return self if d == 1 else Lin(((DivMod("div", self, d), 1),))

    def mod(self, d: int) -> "Lin":
        return Lin() if d == 1 else Lin(((DivMod("mod", self, d), 1),))

    def taken_out(self) -> "Lin":
        """The same value with what each divisor divides taken out of its division or
        modulo: ``(t + 128*c) / 32`` is ``t / 32 + 4*c``, ``(t + 128*c) % 32`` is ``t % 32``,
        so that a copy's address steps by a constant from one chunk to the next (a compiler
        cannot split C's signed ``/`` of a sum). Only where the rest of the dividend stays
        non-negative, so that C's truncating ``/`` and ``%`` still give the floor's values.
        For rendering: the analyses see expressions as schedules build them."""
        if all(isinstance(a, str) for a, _ in self.terms):
            return self
        out = Lin((), self.const)
        for atom, coef in self.terms:
            if isinstance(atom, str):
                out += Lin.var(atom, coef)
                continue
            arg, d = atom.arg.taken_out(), atom.divisor
            taken = {a: c for a, c in arg.terms if c % d == 0}
            const = arg.const - arg.const % d if arg.const > 0 else 0
            rest = Lin(tuple((a, c) for a, c in arg.terms if c % d), arg.const - const)
            if not (taken or const) or not _non_negative(rest):
                rest, taken, const = arg, {}, 0
            whole = Lin(tuple((a, c // d) for a, c in taken.items()), const // d)
            if atom.op == "div":
                part = whole + (Lin(((DivMod("div", rest, d), 1),)) if rest.terms else rest.const // d)
            else:
                part = Lin(((DivMod("mod", rest, d), 1),)) if rest.terms else Lin.constant(rest.const % d)
            out += part * coef
        return out

    # ------------------------------------------------------------ queries
    def vars(self) -> frozenset[str]:
        out = self.__dict__.get("_vars")
        if out is None:
            out = frozenset().union(*({atom} if isinstance(atom, str) else atom.arg.vars()
                                      for atom, _ in self.terms))
            object.__setattr__(self, "_vars", out)
        return out

    def coef(self, var: str) -> int | None:
        """Coefficient of ``var`` if the expression is linear in it, else None."""
        c = 0
        for atom, k in self.terms:
            if atom == var:
                c += k
            elif isinstance(atom, DivMod) and var in atom.arg.vars():
                return None
        return c

    def coefs(self) -> tuple[dict[str, int], set[str]]:
        """Coefficients of the variables it is linear in, and the variables it is not
        linear in (those inside a div/mod); one pass instead of one ``coef`` per variable."""
        linear: dict[str, int] = {}
        nonlinear: set[str] = set()
        for atom, k in self.terms:
            if isinstance(atom, str):
                linear[atom] = linear.get(atom, 0) + k
            else:
                nonlinear |= atom.arg.vars()
        return linear, nonlinear

    def drop(self, names: set[str]) -> "Lin":
        """The expression with the plain-atom variables in ``names`` set to zero."""
        return Lin(tuple((a, c) for a, c in self.terms if a not in names), self.const)

    def subst(self, name: str, repl: "Lin") -> "Lin":
        """The expression with variable ``name`` replaced by ``repl`` (one pass, one result)."""
        if name not in self.vars():
            return self
        terms: dict[Atom, int] = {}
        const = self.const
        for atom, coef in self.terms:
            if atom == name:
                part = repl
            elif isinstance(atom, DivMod) and name in atom.arg.vars():
                arg = atom.arg.subst(name, repl)
                part = arg.floordiv(atom.divisor) if atom.op == "div" else arg.mod(atom.divisor)
            else:
                terms[atom] = terms.get(atom, 0) + coef
                continue
            for a, c in part.terms:
                terms[a] = terms.get(a, 0) + c * coef
            const += part.const * coef
        return _lin(terms, const)

    def rescale(self, name: str, factor: int, new: str) -> "Lin":
        """The expression with ``factor * name`` replaced by ``new`` (inside div/mod too);
        ValueError where a coefficient of ``name`` is not a multiple of ``factor``."""
        if name not in self.vars():
            return self
        terms: dict[Atom, int] = {}
        for atom, coef in self.terms:
            if atom == name:
                if coef % factor:
                    raise ValueError(f"{name} appears with coefficient {coef}, not a multiple of {factor}")
                atom, coef = new, coef // factor
            elif isinstance(atom, DivMod) and name in atom.arg.vars():
                atom = DivMod(atom.op, atom.arg.rescale(name, factor, new), atom.divisor)
            terms[atom] = terms.get(atom, 0) + coef
        return _lin(terms, self.const)

    def evaluate(self, env: dict[str, int]) -> int:
        """The value when each variable ``v`` is ``env[v]``."""
        total = self.const
        for atom, coef in self.terms:
            if isinstance(atom, str):
                v = env[atom]
            else:
                v = atom.arg.evaluate(env)
                v = v // atom.divisor if atom.op == "div" else v % atom.divisor
            total += coef * v
        return total

    def range(self, extents: dict[str, int]) -> tuple[int, int]:
        """Smallest and largest value when each variable ``v`` runs over ``[0, extents[v])``."""
        lo = hi = self.const
        for atom, coef in self.terms:
            if isinstance(atom, str):
                a_lo, a_hi = 0, extents[atom] - 1
            else:
                in_lo, in_hi = atom.arg.range(extents)
                if atom.op == "div":
                    a_lo, a_hi = in_lo // atom.divisor, in_hi // atom.divisor
                else:
                    a_lo, a_hi = (in_lo, in_hi) if 0 <= in_lo and in_hi < atom.divisor else (0, atom.divisor - 1)
            lo += min(coef * a_lo, coef * a_hi)
            hi += max(coef * a_lo, coef * a_hi)
        return lo, hi

    def __str__(self) -> str:
        parts = []
        for atom, coef in self.terms:
            s = atom if isinstance(atom, str) else \
                f"(({atom.arg}) {'/' if atom.op == 'div' else '%'} {atom.divisor})"
            parts.append(s if coef == 1 else f"{s}*{coef}")
        if self.const or not parts:
            parts.append(str(self.const))
        return " + ".join(parts).replace("+ -", "- ")


def _non_negative(e: Lin) -> bool:
    """Whether ``e`` is non-negative whatever its (non-negative) variables: a sum of
    non-negative atoms with positive coefficients and a constant of at least 0."""
    return e.const >= 0 and all(c > 0 and (isinstance(a, str) or a.op == "mod" or _non_negative(a.arg))
                                for a, c in e.terms)


def _lin(terms: dict[Atom, int], const: int) -> Lin:
    """The expression of merged ``terms``, with ``c*d*(e / d) + c*(e % d)`` folded back into
    ``c*e``: a fused loop read in the order it was fused (a 1x1 convolution's ``y*W + x``)
    indexes linearly again, so its accesses stay contiguous and vectorise."""
    for atom in [a for a in terms if isinstance(a, DivMod) and a.op == "mod"]:
        c, div = terms.get(atom, 0), DivMod("div", atom.arg, atom.divisor)
        if c and terms.get(div) == c * atom.divisor:
            del terms[atom], terms[div]
            for a, k in atom.arg.terms:
                terms[a] = terms.get(a, 0) + k * c
            return _lin(terms, const + atom.arg.const * c)   # the arg may complete another pair
    return Lin(tuple((a, c) for a, c in terms.items() if c), const)
