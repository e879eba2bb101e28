"""Reads the attribute docstrings of config dataclasses, so one docstring serves readers of the
code, `--help`, and the generated config reference (no second copy of the text to drift)."""
import ast
import dataclasses
import inspect
import textwrap
from functools import lru_cache


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict:
    """Map field name -> the string literal written right after that field in the class body."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def undocumented_fields(cls: type) -> list:
    """Fields of a dataclass that have no docstring (a test keeps this list empty)."""
    docs = field_docs(cls)
    return [f.name for f in dataclasses.fields(cls) if f.init and f.name not in docs]
