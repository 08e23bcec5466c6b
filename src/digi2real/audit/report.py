"""What an audit writes: ``audit.json`` (every number), ``audit.md`` (the comparison table and the lists),
``audit.html`` (self-contained, with the matched image pairs side by side), ``nearest-<set>-in-<reference>.csv`` and
``distinct-<set>.csv`` (every identity's most similar reference identity and most similar other identity);
``section.html`` is the same HTML section alone, which the run report includes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from digi2real.audit import measures as M
from digi2real.fileio import write_json, write_text
from digi2real.report import html as H

#: Matches and duplicate pairs listed in audit.json per list (the counts are always exact).
LISTED = 10_000
TILE = 96


def comparison_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """One row per audited set: the table `audit A B C` is for."""
    refs = [r["name"] for r in summary["references"]]
    real = [r["name"] for r in summary["references"] if r["real"]]
    headers = ["dataset", "identities", "images", *[f"matching {r}" for r in refs], "duplicate pairs",
               "max cos. to another (median)", "genuine cos. (median)", "impostor cos. (median)", "d'",
               "landmark spread px", "brightness std", "contrast std", *[f"FD to {r}" for r in real]]
    rows = []
    for d in summary["datasets"]:
        c, v = d["consistency"], d["variation"]

        def med(part: dict | None) -> float | None:
            return None if part is None else part.get("median")

        rows.append([d["name"], d["identities"], d["images"],
                     *[d["contamination"].get(r, {}).get("matched_identities") for r in refs],
                     d["distinctness"]["duplicate_pairs"], d["distinctness"]["max_cosine"]["median"],
                     c["genuine"]["median"], c["impostor"]["median"], c["d_prime"],
                     med(v["landmark_spread_px"]), med(v["brightness_std"]), med(v["contrast_std"]),
                     *[d["frechet"].get(r) for r in real]])
    return headers, rows


# ------------------------------------------------------------------------------------------------------ markdown


def _md_cell(v: Any) -> str:
    return H.fmt(v).replace("|", "/") if not isinstance(v, str) else v.replace("|", "/")


def _md_table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
            *["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in rows]]


def markdown(summary: dict[str, Any]) -> str:
    t, e = summary["threshold"], summary["embedding"]
    lines = ["# Face-set audit", "",
             f"Embedding: {e['what']}, by {e['model']} (sha256 {e['sha256'][:12]}, {e['dim']}-d).", "",
             f"Match threshold: cosine {t['value']:.4f}, {t['source']}"
             + (f" (reference {t['calibrated_on']})" if t.get("calibrated_on") else "") + ".", ""]
    headers, rows = comparison_rows(summary)
    lines += _md_table(headers, rows) + [""]
    for d in summary["datasets"]:
        lines += [f"## {d['name']}", ""]
        for ref, c in d["contamination"].items():
            chance = c["expected_false_matches"]
            lines.append(f"- {ref}: {c['matched_identities']} of {c['identities']} identities above the threshold "
                         f"({'-' if chance is None else f'{chance:.3g}'} expected by chance at this FAR; "
                         f"{c['comparisons']:,} identity pairs compared); nearest prototype cosine median "
                         f"{H.fmt(c['nearest_prototype_cosine']['median'])}, max "
                         f"{H.fmt(c['nearest_prototype_cosine']['max'])}")
            for m in c["matches"][:20]:
                lines.append(f"  - {m['identity']} ~ {m['reference_identity']}: prototype {m['prototype_cosine']:.3f}, "
                             f"best image pair {m['image_cosine']:.3f}")
        dist = d["distinctness"]
        lines.append(f"- duplicates: {dist['duplicate_pairs']} pairs of identities above the threshold")
        for p in dist["duplicates"][:20]:
            lines.append(f"  - {p['identity_a']} ~ {p['identity_b']}: prototype {p['prototype_cosine']:.3f}")
        lines.append("")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------ html


def _count(n: int, one: str, many: str) -> str:
    return f"{n:,} {one if n == 1 else many}"


def _listed(shown: int, total: int) -> str:
    return "shown" if shown >= total else f"the first {shown} shown"


def _thumb(image, row: int, label: str) -> str:
    try:
        rgb = image(int(row))
    except Exception as exc:  # noqa: BLE001 - an unreadable image costs its tile, not the page
        return f'<span class="na">{H.esc(label)}: not shown ({H.esc(type(exc).__name__)})</span>'
    return H.img(H.array_png(rgb, TILE), label, cls="tile", title=label)


def _pair(left, lrow: int, lname: str, right, rrow: int, rname: str, caption: str) -> str:
    return ('<figure class="pair" style="display:inline-block;margin:4px;text-align:center">'
            f"{_thumb(left, lrow, lname)}{_thumb(right, rrow, rname)}"
            f"<figcaption>{H.esc(caption)}</figcaption></figure>")


def _contamination_html(d, ref, c: M.Contamination, c_dict: dict, shown: int) -> str:
    out = []
    if c.matches:
        chance = c_dict["expected_false_matches"]
        n = c_dict["matched_identities"]
        out.append(H.para(f"{_count(n, 'identity', 'identities')} of {d.name} {'is' if n == 1 else 'are'} above the "
                          f"threshold against {ref.name} ({'-' if chance is None else f'{chance:.3g}'} expected by "
                          f"chance); {_listed(min(shown, len(c.matches)), len(c.matches))}, with the closest images:"))
        picks = [(m.identity, m.reference_identity, m.prototype_cosine, m.image_cosine, m.row, m.reference_row, True)
                 for m in c.matches[:shown]]
    else:
        out.append(H.para(f"No identity of {d.name} is above the threshold against {ref.name}; its closest "
                          f"identities, below the threshold:"))
        order = np.argsort(-c.nearest_cosine, kind="stable")[:shown]
        picks = [(d.embedded.identities[i], ref.embedded.identities[int(c.image_reference[i])],
                  float(c.nearest_cosine[i]), float(c.image_cosine[i]), int(c.image_rows[i, 0]),
                  int(c.image_rows[i, 1]), False) for i in order]
    tiles = [_pair(d.image, row, f"{d.name}: {who}", ref.image, rrow, f"{ref.name}: {them}",
                   f"{who} ~ {them}: prototype {pc:.3f}, images {ic:.3f}" + (" (match)" if hit else ""))
             for who, them, pc, ic, row, rrow, hit in picks]
    return "".join(out) + "<div>" + "".join(tiles) + "</div>"


def _distinct_html(d, dist: M.Distinctness, shown: int) -> str:
    if dist.duplicates:
        tiles = [_pair(d.image, p.row_a, f"{d.name}: {p.identity_a}", d.image, p.row_b, f"{d.name}: {p.identity_b}",
                       f"{p.identity_a} ~ {p.identity_b}: prototype {p.prototype_cosine:.3f}, images "
                       f"{p.image_cosine:.3f}") for p in dist.duplicates[:shown]]
        n = dist.duplicate_pairs
        head = H.para(f"{_count(n, 'pair', 'pairs')} of identities of {d.name} {'is' if n == 1 else 'are'} above the "
                      f"threshold (called one person); {_listed(min(shown, len(dist.duplicates)), n)}, with the "
                      "closest images:")
        return head + "<div>" + "".join(tiles) + "</div>"
    return H.para(f"No two identities of {d.name} are above the threshold.")


def _dataset_html(d, result: dict, refs: dict, shown: int) -> str:
    objs = result["_objects"]
    parts = [f"<h3>{H.esc(d.name)}</h3>",
             H.para(f"{d.kind}: {result['identities']:,} identities, {result['images']:,} images ({d.path}); "
                    f"{d.note}.")]
    rows = []
    for name, c in result["contamination"].items():
        n, i = c["nearest_prototype_cosine"], c["image_max_cosine"]
        rows.append([name, c["reference_identities"], c["matched_identities"], c["expected_false_matches"],
                     n["median"], n["p99"], n["max"], i["median"], i["max"]])
    if rows:
        parts.append("<h4>Contamination: is anyone of the references in it?</h4>")
        parts.append(H.table(["reference", "identities", "matched identities", "expected by chance",
                              "nearest prototype cos. (median)", "(p99)", "(max)", "best image pair (median)",
                              "(max)"], rows))
        for name, c in objs["contamination"].items():
            parts.append(f"<h5>{H.esc(name)}</h5>")
            parts.append(_contamination_html(d, refs[name], c, result["contamination"][name], shown))
    dist = result["distinctness"]
    parts.append("<h4>Distinctness: are its identities different people?</h4>")
    parts.append(H.table(["identities", "above the threshold", "duplicate pairs", "max cos. to another (median)",
                          "(p95)", "(max)"],
                         [[dist["identities"], dist["identities_above"], dist["duplicate_pairs"],
                           dist["max_cosine"]["median"], dist["max_cosine"]["p95"], dist["max_cosine"]["max"]]]))
    parts.append(_distinct_html(d, objs["distinctness"], shown))
    c = result["consistency"]
    parts.append("<h4>Consistency and variation</h4>")
    parts.append(H.table(["genuine cos. (median)", "(p5)", "impostor cos. (median)", "(p99)", "d'",
                          "to prototype (median)", "genuine pairs", "impostor pairs"],
                         [[c["genuine"]["median"], c["genuine"]["p5"], c["impostor"]["median"],
                           c["impostor"]["p99"], c["d_prime"], c["to_prototype"]["median"], c["genuine_pairs_total"],
                           c["impostor_pairs"]]]))
    if c["worst"]:
        parts.append(H.details("least consistent identities", H.table(
            ["identity", "images", "mean pairwise cos.", "mean cos. to prototype"],
            [[w["identity"], w["images"], w["pairwise"], w["to_prototype"]] for w in c["worst"]])))
    v = result["variation"]
    vrows = [[what, part["median"], part["p5"], part["p95"]] if part else [what, "not measured", None, None]
             for what, part in (("landmark spread (px, 112 crop)", v["landmark_spread_px"]),
                                ("brightness std (grey level)", v["brightness_std"]),
                                ("contrast std (grey level)", v["contrast_std"]))]
    parts.append(H.table(["within an identity", "median", "p5", "p95"], vrows))
    if result["frechet"]:
        parts.append("<h4>Realism gap</h4>")
        parts.append(H.table(["real reference", "Fréchet distance (ArcFace embeddings)"],
                             [[k, v] for k, v in result["frechet"].items()]))
    return "".join(parts)


def section_html(summary: dict[str, Any], inputs, shown: int) -> str:
    t, e = summary["threshold"], summary["embedding"]
    refs = {r.name: r for r in inputs.refs}
    head = [H.para(f"Every set embedded by {e['model']} (sha256 {e['sha256'][:12]}, {e['dim']}-d); {e['what']}. "
                   "An identity is its prototype (the normalised mean of its images' vectors)."),
            H.para(f"Match threshold: cosine {t['value']:.4f}, {t['source']}"
                   + (f", reference {t['calibrated_on']}" if t.get("calibrated_on") else "")
                   + ". Two identities are called one person above it; 'expected by chance' is how many identities "
                   "a threshold at this FAR matches wrongly (FAR x the identities searched when calibrated on a "
                   "search, FAR x the identity pairs compared when on single pairs).")]
    if summary["references"]:
        head.append(H.table(["reference", "kind", "real", "identities", "images", "impostor scores", "how"],
                            [[r["name"], r["kind"], r["real"], r["identities"], r["images"], r["impostor_scores"],
                              r["note"]] for r in summary["references"]]))
    else:
        head.append(H.para("No reference set was given: contamination is not measured."))
    headers, rows = comparison_rows(summary)
    head.append(H.table(headers, rows))
    body = [_dataset_html(d, r, refs, shown) for d, r in zip(inputs.datasets, summary["datasets"])]
    return "".join(head) + "".join(body)


def write_outputs(out_dir: Path, summary: dict[str, Any], inputs, shown: int = 6) -> None:
    """audit.json, audit.md, section.html and audit.html, each written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    section = section_html(summary, inputs, shown)
    plain = {**summary, "datasets": [{k: v for k, v in d.items() if k != "_objects"} for d in summary["datasets"]]}
    write_json(out_dir / "audit.json", plain)
    write_text(out_dir / "audit.md", markdown(plain))
    for d, result in zip(inputs.datasets, summary["datasets"]):
        refs = {r.name: r for r in inputs.refs}
        for ref_name, c in result["_objects"]["contamination"].items():
            write_text(out_dir / f"nearest-{_file_part(d.name)}-in-{_file_part(ref_name)}.csv",
                       nearest_csv(d, refs[ref_name], c))
        write_text(out_dir / f"distinct-{_file_part(d.name)}.csv", distinct_csv(d, result["_objects"]["distinctness"]))
    write_text(out_dir / "section.html", section)
    names = ", ".join(d["name"] for d in summary["datasets"])
    write_text(out_dir / "audit.html", H.page(f"Face-set audit: {names}", f"digi2real audit, {summary['created']}",
                                            [("audit", "Audit")], [H.section("audit", "Audit", section)]))


def _file_part(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name) or "set"


def _csv(rows: list[list[Any]]) -> str:
    import csv
    import io

    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def nearest_csv(d, ref, c: M.Contamination) -> str:
    """Every identity of the dataset with its most similar reference identity (prototype cosine), the best image
    pair among its nearest reference identities and whether it is above the threshold."""
    rows: list[list[Any]] = [["identity", "nearest_reference_identity", "prototype_cosine", "above_threshold",
                              "image_reference_identity", "image_cosine", "image", "reference_image"]]
    for i, name in enumerate(d.embedded.identities):
        a, b = int(c.image_rows[i, 0]), int(c.image_rows[i, 1])
        rows.append([name, ref.embedded.identities[int(c.nearest[i])], f"{float(c.nearest_cosine[i]):.6f}",
                     int(c.nearest_cosine[i] > c.threshold.value), ref.embedded.identities[int(c.image_reference[i])],
                     f"{float(c.image_cosine[i]):.6f}", d.label(a), ref.label(b)])
    return _csv(rows)


def distinct_csv(d, dist: M.Distinctness) -> str:
    """Every identity of the dataset with its most similar other identity (the paper's Table 4 criterion)."""
    names = d.embedded.identities
    rows: list[list[Any]] = [["identity", "nearest_other_identity", "prototype_cosine", "above_threshold"]]
    for i, name in enumerate(names):
        j = int(dist.nearest[i])
        cos = float(dist.max_cosine[i])
        rows.append([name, names[j] if j >= 0 else "", f"{cos:.6f}" if np.isfinite(cos) else "",
                     int(np.isfinite(cos) and cos > dist.threshold.value)])
    return _csv(rows)


def contamination_dict(c: M.Contamination, calibration: str) -> dict[str, Any]:
    """The JSON of one contamination, with the false matches expected by chance at the threshold's FAR: FAR times
    the identities searched when it was calibrated on a search, FAR times the identity pairs compared when on
    single pairs."""
    pairs = len(c.nearest) * c.reference_identities
    far = c.threshold.far
    chance = None if far is None else far * (len(c.nearest) if calibration == "search" else pairs)
    return {**c.to_dict(LISTED), "comparisons": pairs,
            "expected_false_matches": None if chance is None else round(chance, 6)}
