"""The embedded offline corpus: documents built at run time from the running Python installation.

Three domains, each a tuple of `str` documents, built without network in about a second:

* "code":  standard-library modules (`*.py` under `sysconfig.get_paths()["stdlib"]`), each headed by a
           comment line naming its path.
* "prose": the language-reference topics shipped in `pydoc_data.topics`, and one API page per
           standard-library module assembled from its module, class and function docstrings.
* "math":  worksheets of generated arithmetic problems, each with a worked step-by-step solution and a
           final `Answer:` line.

Everything is deterministic: files are chosen by a hash of their relative path (not by wall clock or
directory order), sizes are capped by the constants below, and the arithmetic generator has a fixed seed.
The corpus depends only on the Python installation (its standard-library version). The results are cached
per process.

Worked solutions use one convention that tests rely on: an indented line made only of integers, `+ - * ( )`
and ` = ` is a chain of equal expressions (e.g. `  347 * 26 = 6940 + 2082 = 9022`).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import pathlib
import random
import sysconfig

DOMAINS = ("code", "prose", "math")

CODE_CHARS = 2_000_000  # total size cap of the "code" domain
DOCSTRING_PAGE_CHARS = 500_000  # total size cap of the module API pages in "prose"
MATH_CHARS = 1_000_000  # total size cap of the "math" domain
MAX_DOCUMENT_CHARS = 24_000  # longer files and pages are cut at the last line break before this
MATH_SEED = 20_261_101
PROBLEMS_PER_WORKSHEET = (4, 9)  # inclusive range

# Directories of the standard library that are tests, tables, GUI demos or bundled wheels, not typical code.
_SKIPPED_DIRS = frozenset({
    "__pycache__", "encodings", "ensurepip", "idle_test", "idlelib", "lib2to3", "pydoc_data",
    "site-packages", "test", "tests", "tkinter", "turtledemo",
})


def documents(domain: str) -> tuple[str, ...]:
  """Returns the documents of one domain ("code", "prose" or "math"), cached."""
  builders = {"code": code_documents, "prose": prose_documents, "math": math_documents}
  if domain not in builders:
    raise ValueError(f"Unknown corpus domain {domain!r}; choose one of {DOMAINS}.")
  return builders[domain]()


@functools.cache
def _stdlib_sources() -> tuple[tuple[str, str], ...]:
  """(relative path, source text) of the eligible standard-library modules, in a fixed pseudo-random order.

  The order is that of the SHA-1 of the relative path, so a size cap keeps a spread of the whole library
  instead of its alphabetical beginning.
  """
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  paths = [p for p in root.rglob("*.py") if not _SKIPPED_DIRS.intersection(p.relative_to(root).parts[:-1])]
  named = sorted(((p.relative_to(root).as_posix(), p) for p in paths),
                 key=lambda item: hashlib.sha1(item[0].encode()).hexdigest())
  sources = []
  for relative, path in named:
    try:
      text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
      continue
    if text.strip():
      sources.append((relative, text))
  return tuple(sources)


def _truncate(text: str, limit: int = MAX_DOCUMENT_CHARS) -> str:
  """`text` cut at the last line break before `limit` characters (unchanged when shorter)."""
  if len(text) <= limit:
    return text
  cut = text.rfind("\n", 0, limit)
  return text[: cut + 1 if cut > 0 else limit]


def _take_until(candidates, budget: int) -> list[str]:
  """Distinct non-empty documents from `candidates`, in order, until their total length reaches `budget`."""
  taken, seen, total = [], set(), 0
  for doc in candidates:
    if not doc.strip() or doc in seen:
      continue
    taken.append(doc)
    seen.add(doc)
    total += len(doc)
    if total >= budget:
      break
  return taken


@functools.cache
def code_documents() -> tuple[str, ...]:
  """Standard-library modules as code documents: `# Lib/<path>\\n<source>`, sorted by path."""
  docs = _take_until((f"# Lib/{rel}\n{_truncate(src)}" for rel, src in _stdlib_sources()), CODE_CHARS)
  return tuple(sorted(docs))


def _api_page(relative: str, source: str) -> str:
  """One module's docstrings as a documentation page; empty when the module has (almost) none."""
  try:
    tree = ast.parse(source)
  except SyntaxError:
    return ""
  module = relative[: -len(".py")].replace("/", ".").removesuffix(".__init__")
  sections = []
  doc = ast.get_docstring(tree)
  if doc:
    sections.append(doc)

  def visit(body, prefix: str):
    for node in body:
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
        doc = ast.get_docstring(node)
        if isinstance(node, ast.ClassDef):
          if doc:
            sections.append(f"class {prefix}{node.name}\n\n{_indent(doc)}")
          visit(node.body, f"{prefix}{node.name}.")
        elif doc:
          sections.append(f"{prefix}{node.name}({ast.unparse(node.args)})\n\n{_indent(doc)}")

  visit(tree.body, "")
  if sum(len(s) for s in sections) < 200:
    return ""
  return _truncate(f"Module {module}\n\n" + "\n\n".join(sections) + "\n")


def _indent(text: str) -> str:
  return "\n".join(f"    {line}" if line else "" for line in text.splitlines())


@functools.cache
def prose_documents() -> tuple[str, ...]:
  """Language-reference topics from `pydoc_data` and per-module API pages from docstrings, sorted."""
  try:
    from pydoc_data.topics import topics  # pylint: disable=import-outside-toplevel
  except ImportError:  # Some distributions split pydoc_data out; the API pages remain.
    topics = {}
  reference = [f"Python language reference: {name}\n\n{_truncate(text.strip())}\n"
               for name, text in sorted(topics.items()) if text.strip()]
  pages = _take_until((_api_page(rel, src) for rel, src in _stdlib_sources()), DOCSTRING_PAGE_CHARS)
  return tuple(sorted(reference + pages))


# ---------------------------------------------------------------------------------------------------------
# Arithmetic problems. Each generator returns (question, worked-solution lines, answer).

_PLACES = ("ones", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands", "millions")


def _number(rng: random.Random, min_digits: int, max_digits: int) -> int:
  digits = rng.randint(min_digits, max_digits)
  return rng.randint(10 ** (digits - 1), 10**digits - 1)


def _place_parts(n: int) -> list[int]:
  """Nonzero place-value parts of n, largest first: 589 -> [500, 80, 9]."""
  parts = [int(d) * 10**i for i, d in enumerate(reversed(str(n)))]
  return [p for p in reversed(parts) if p]


def _addition(rng):
  a, b = _number(rng, 2, 6), _number(rng, 2, 6)
  lines, carry = ["Add column by column from the right."], 0
  da, db = str(a)[::-1], str(b)[::-1]
  for i in range(max(len(da), len(db))):
    x = int(da[i]) if i < len(da) else 0
    y = int(db[i]) if i < len(db) else 0
    total = x + y + carry
    lines.append(f"{_PLACES[i]}: {x} + {y} + {carry} = {total}, write {total % 10}, carry {total // 10}")
    carry = total // 10
  if carry:
    lines.append(f"The final carry {carry} becomes the leading digit.")
  lines.append(f"  {a} + {b} = {a + b}")
  return f"What is {a} + {b}?", lines, str(a + b)


def _subtraction(rng):
  a, b = sorted((_number(rng, 2, 6), _number(rng, 2, 5)), reverse=True)
  parts = _place_parts(b)
  lines = ["Subtract the place-value parts of the second number one at a time."]
  chain, rest = [f"{a} - {b}"], a
  for i, part in enumerate(parts):
    chain.append(" - ".join([str(rest)] + [str(p) for p in parts[i:]]))
    rest -= part
  chain.append(str(rest))
  lines.append("  " + " = ".join(chain))
  lines.append(f"Check by adding back: {rest} + {b} = {a}.")
  return f"What is {a} - {b}?", lines, str(a - b)


def _multiplication(rng):
  a, b = _number(rng, 2, 4), _number(rng, 2, 3)
  parts = _place_parts(b)
  products = [a * p for p in parts]
  lines = [f"Split {b} into place values and multiply each part by {a}."]
  lines.append(f"  {a} * {b} = " + " + ".join(f"{a} * {p}" for p in parts))
  lines.extend(f"  {a} * {p} = {a * p}" for p in parts)
  lines.append("  " + " + ".join(map(str, products)) + f" = {a * b}")
  return f"What is {a} * {b}?", lines, str(a * b)


def _division(rng):
  divisor = rng.randint(2, 99)
  dividend = rng.randint(divisor * 10, 99_999)
  lines, quotient, remainder, started = ["Long division, one digit at a time."], 0, 0, False
  for digit in str(dividend):
    current = remainder * 10 + int(digit)
    q, remainder = divmod(current, divisor)
    quotient = quotient * 10 + q
    started = started or current >= divisor
    if started:
      lines.append(f"  {current} = {divisor} * {q} + {remainder}")
  lines.append(f"So the quotient is {quotient} and the remainder is {remainder}:")
  lines.append(f"  {dividend} = {divisor} * {quotient} + {remainder}")
  return (f"Divide {dividend} by {divisor}. Give the quotient and the remainder.", lines,
          f"quotient {quotient}, remainder {remainder}")


def _order_of_operations(rng):
  a, b, c = rng.randint(2, 60), rng.randint(2, 60), rng.randint(2, 12)
  d = rng.randint(1, 50)
  form = rng.randrange(3)
  if form == 0:
    chain = [f"({a} + {b}) * {c} - {d}", f"{a + b} * {c} - {d}", f"{(a + b) * c} - {d}", str((a + b) * c - d)]
    rule = "Brackets first, then multiplication, then subtraction."
  elif form == 1:
    chain = [f"{a} + {b} * {c} - {d}", f"{a} + {b * c} - {d}", f"{a + b * c} - {d}", str(a + b * c - d)]
    rule = "Multiplication before addition and subtraction, then left to right."
  else:
    chain = [f"{a} * {c} + {b} * {d}", f"{a * c} + {b} * {d}", f"{a * c} + {b * d}", str(a * c + b * d)]
    rule = "Both products first, then the sum."
  return f"What is {chain[0]}?", [rule, "  " + " = ".join(chain)], chain[-1]


def _linear_equation(rng):
  a, x, b = rng.randint(2, 15), rng.randint(-20, 40), rng.randint(1, 90)
  sign = rng.choice("+-")
  c = a * x + b if sign == "+" else a * x - b
  if sign == "+":
    first = f"Subtract {b} from both sides: {a} * x = {c} - {b} = {c - b}."
  else:
    first = f"Add {b} to both sides: {a} * x = {c} + {b} = {c + b}."
  lhs = f"{a} * ({x})" if x < 0 else f"{a} * {x}"
  lines = [first, f"Divide both sides by {a}: x = {a * x} / {a} = {x}.", "Check by substituting x back:",
           f"  {lhs} {sign} {b} = {a * x} {sign} {b} = {c}"]
  return f"Solve for x: {a} * x {sign} {b} = {c}.", lines, f"x = {x}"


_GENERATORS = (_addition, _subtraction, _multiplication, _division, _order_of_operations, _linear_equation)


def arithmetic_problem(rng: random.Random) -> str:
  """One problem as text: `Problem: ...`, `Solution:` with worked lines, `Answer: ...`."""
  question, lines, answer = rng.choice(_GENERATORS)(rng)
  return "\n".join([f"Problem: {question}", "Solution:", *lines, f"Answer: {answer}"])


@functools.cache
def math_documents() -> tuple[str, ...]:
  """Arithmetic worksheets of 4-9 worked problems each, up to `MATH_CHARS` in total, in generation order."""
  rng = random.Random(MATH_SEED)
  docs, total = [], 0
  while total < MATH_CHARS:
    count = rng.randint(*PROBLEMS_PER_WORKSHEET)
    problems = [arithmetic_problem(rng) for _ in range(count)]
    doc = f"Arithmetic practice, worksheet {len(docs) + 1}\n\n" + "\n\n".join(problems) + "\n"
    docs.append(doc)
    total += len(doc)
  return tuple(docs)
