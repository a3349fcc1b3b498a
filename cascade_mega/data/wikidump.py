"""Articles of a MediaWiki XML dump (`pages-articles*.xml[.bz2|.gz]`), one document each.

Streams the XML (memory does not grow with the dump), keeps main-namespace pages that are not
redirects, and yields "Title\\n\\nwikitext": the markup is kept as written (templates, links,
tables). Stripping it is a corpus decision for a cleaning pass, not for the tokenizer's input.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]  # drop the export-schema namespace


def articles(stream):
    """Documents of the dump read from a binary stream."""
    title = ns = text = None
    redirect = False
    for event, elem in ET.iterparse(stream, events=("end",)):
        tag = _local(elem.tag)
        if tag == "title":
            title = elem.text or ""
        elif tag == "ns":
            ns = (elem.text or "").strip()
        elif tag == "redirect":
            redirect = True
        elif tag == "text":
            text = elem.text or ""
        elif tag == "page":
            if ns == "0" and not redirect and text and text.strip():
                yield f"{title}\n\n{text}"
            title = ns = text = None
            redirect = False
            elem.clear()  # the page's subtree is done with
