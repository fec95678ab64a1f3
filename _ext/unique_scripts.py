"""Sphinx extension for the book: every script at most once per page.

Sphinx 7.4 keeps two copies of an inline script that an extension adds once the HTML builder exists (the
registry's copy has the file name "" and the builder's None, so they do not compare equal). sphinx-thebe
adds ``const THEBE_JS_URL = ...`` that way, and every page then logged "SyntaxError: Identifier
'THEBE_JS_URL' has already been declared" (found by scripts/check_book.py).
"""
from __future__ import annotations


def _unique_scripts(app, pagename, templatename, context, doctree) -> None:
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, kept = set(), []
    for js in scripts:
        attributes = getattr(js, "attributes", {}) or {}
        key = (getattr(js, "filename", js) or "", tuple(sorted((k, str(v)) for k, v in attributes.items())))
        if key not in seen:
            seen.add(key)
            kept.append(js)
    context["script_files"] = kept


def setup(app):
    app.connect("html-page-context", _unique_scripts)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
