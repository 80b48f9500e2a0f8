"""Plain text of a PDF written by Typst, without a PDF library (the tests read the report with it).

Enough of PDF for Typst's output: uncompressed object table, Flate streams, Type0 fonts with a ToUnicode
CMap, text shown with Tj / TJ. Text runs (BT ... ET) are joined with spaces, so compare after collapsing
whitespace. Not a general PDF reader.
"""
from __future__ import annotations

import re
import sys
import zlib
from pathlib import Path

_OBJ = re.compile(rb"(\d+)\s+(\d+)\s+obj\b")
_REF = rb"(\d+)\s+\d+\s+R"


def _objects(data: bytes) -> dict[int, tuple[bytes, bytes | None]]:
    """Object number -> (dictionary text, decoded stream or None), scanning sequentially so that stream
    bytes are never mistaken for object headers."""
    objs, pos = {}, 0
    while True:
        m = _OBJ.search(data, pos)
        if not m:
            return objs
        start = m.end()
        end = data.find(b"endobj", start)
        s = data.find(b"stream", start)
        if s != -1 and (end == -1 or s < end):
            head = data[start:s]
            length = re.search(rb"/Length\s+(\d+)(?!\s+\d+\s+R)", head)
            body_start = s + len(b"stream")
            body_start += 2 if data[body_start:body_start + 2] == b"\r\n" else 1
            if length:
                raw = data[body_start:body_start + int(length.group(1))]
            else:
                raw = data[body_start:data.find(b"endstream", body_start)].rstrip(b"\r\n")
            stream = zlib.decompress(raw) if b"/FlateDecode" in head else raw
            objs[int(m.group(1))] = (head, stream)
            pos = data.find(b"endobj", body_start + len(raw))
        else:
            objs[int(m.group(1))] = (data[start:end], None)
            pos = end
        if pos == -1:
            return objs


def _cmap(stream: bytes) -> dict[bytes, str]:
    out = {}

    def uni(h):
        return bytes.fromhex(h.decode()).decode("utf-16-be", errors="replace")

    for block in re.findall(rb"beginbfchar(.*?)endbfchar", stream, re.S):
        for src, dst in re.findall(rb"<([0-9A-Fa-f]+)>\s*<([0-9A-Fa-f]*)>", block):
            out[bytes.fromhex(src.decode())] = uni(dst)
    for block in re.findall(rb"beginbfrange(.*?)endbfrange", stream, re.S):
        for lo, hi, rest in re.findall(rb"<([0-9A-Fa-f]+)>\s*<([0-9A-Fa-f]+)>\s*(<[0-9A-Fa-f]+>|\[[^\]]*\])",
                                       block):
            a, b, width = int(lo, 16), int(hi, 16), len(lo) // 2
            dsts = re.findall(rb"<([0-9A-Fa-f]+)>", rest)
            for i, code in enumerate(range(a, b + 1)):
                key = code.to_bytes(width, "big")
                if rest.startswith(b"["):
                    if i < len(dsts):
                        out[key] = uni(dsts[i])
                else:
                    base = bytes.fromhex(dsts[0].decode())
                    val = int.from_bytes(base, "big") + i
                    out[key] = val.to_bytes(len(base), "big").decode("utf-16-be", errors="replace")
    return out


def _literal(s: bytes, i: int) -> tuple[bytes, int]:
    """Parse a PDF literal string starting after '(' at s[i]; return (bytes, index after ')')."""
    out, depth = bytearray(), 1
    esc = {ord("n"): 10, ord("r"): 13, ord("t"): 9, ord("b"): 8, ord("f"): 12}
    while i < len(s):
        c = s[i]
        if c == 0x5C:  # backslash
            i += 1
            c = s[i]
            if 0x30 <= c <= 0x37:
                j = i
                while j < i + 3 and j < len(s) and 0x30 <= s[j] <= 0x37:
                    j += 1
                out.append(int(s[i:j], 8) & 0xFF)
                i = j
                continue
            if c in (0x0A, 0x0D):  # line continuation
                i += 1
                continue
            out.append(esc.get(c, c))
        elif c == 0x28:
            depth += 1
            out.append(c)
        elif c == 0x29:
            depth -= 1
            if depth == 0:
                return bytes(out), i + 1
            out.append(c)
        else:
            out.append(c)
        i += 1
    return bytes(out), i


_TOKEN = re.compile(rb"\(|<[0-9A-Fa-f\s]*>|\[|\]|/[^\s/\[\]()<>]+|[-+]?\d*\.?\d+|[A-Za-z'\"*]+")


def _show(content: bytes, fonts: dict[bytes, dict[bytes, str]]) -> list[str]:
    runs, cur, cmap, stack, i = [], [], {}, [], 0
    while True:
        m = _TOKEN.search(content, i)
        if not m:
            break
        tok, i = m.group(0), m.end()
        if tok == b"(":
            val, i = _literal(content, i)
            stack.append(val)
        elif tok.startswith(b"<"):
            stack.append(bytes.fromhex(re.sub(rb"\s", b"", tok[1:-1]).decode()))
        elif tok in (b"[", b"]"):
            stack.append(tok)
        elif tok[:1] == b"/" or tok[:1].isdigit() or tok[:1] in b"-+.":
            stack.append(tok)
        else:
            op = tok
            if op == b"Tf" and len(stack) >= 2:
                cmap = fonts.get(stack[-2][1:], {})
            elif op in (b"Tj", b"'", b'"') and stack and isinstance(stack[-1], bytes):
                cur.append(_decode(stack[-1], cmap))
            elif op == b"TJ":
                for item in stack[stack.index(b"[") + 1 if b"[" in stack else 0:]:
                    if item in (b"[", b"]"):
                        continue
                    if item[:1] in b"-+.0123456789" and re.fullmatch(rb"[-+]?\d*\.?\d+", item):
                        if float(item) < -250:  # a wide negative kern is a word gap
                            cur.append(" ")
                    else:
                        cur.append(_decode(item, cmap))
            elif op == b"ET":
                runs.append("".join(cur))
                cur = []
            stack = []
    if cur:
        runs.append("".join(cur))
    return runs


def _decode(b: bytes, cmap: dict[bytes, str]) -> str:
    if not cmap:
        return b.decode("latin-1")
    width = len(next(iter(cmap)))
    return "".join(cmap.get(b[k:k + width], "") for k in range(0, len(b), width))


def pdf_text(path) -> str:
    """All text of the PDF at `path`, page by page, runs separated by spaces and pages by newlines."""
    objs = _objects(Path(path).read_bytes())

    def resolve(ref: bytes):
        m = re.fullmatch(rb"\s*" + _REF + rb"\s*", ref)
        return objs.get(int(m.group(1)), (b"", None)) if m else (ref, None)

    cmaps = {}
    for num, (head, _s) in objs.items():
        tu = re.search(rb"/ToUnicode\s+" + _REF, head)
        if tu and int(tu.group(1)) in objs:
            cmaps[num] = _cmap(objs[int(tu.group(1))][1] or b"")
    pages = []
    for num, (head, _s) in objs.items():
        if not re.search(rb"/Type\s*/Page(?![s\w])", head):
            continue
        res = re.search(rb"/Resources\s*(" + _REF + rb"|<<)", head)
        res_text = head
        if res and res.group(1) != b"<<":
            res_text = objs.get(int(res.group(2)), (b"", None))[0]
        fonts = {}
        fm = re.search(rb"/Font\s*(<<(.*?)>>|" + _REF + rb")", res_text, re.S)
        if fm:
            font_dict = fm.group(2) if fm.group(2) is not None else objs.get(int(fm.group(3)), (b"", None))[0]
            for name, ref in re.findall(rb"/([^\s/<>\[\]]+)\s+(\d+)\s+\d+\s+R", font_dict):
                fonts[name] = cmaps.get(int(ref), {})
        cm = re.search(rb"/Contents\s*(\[[^\]]*\]|" + _REF + rb")", head)
        refs = re.findall(_REF, cm.group(1)) if cm else []
        content = b"\n".join(objs.get(int(r), (b"", b""))[1] or b"" for r in refs)
        pages.append(" ".join(_show(content, fonts)))
    return "\n".join(pages)


if __name__ == "__main__":
    print(pdf_text(sys.argv[1]))
