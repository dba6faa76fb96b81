"""The one prediction loop: many questions answered in batches, the next batch's audio decoded
while the model works on this one, one bad file never stopping the others. The runs of `mellow
ask`/`caption`/`compare` (run.py) and the benchmarks all go through `answer_in_batches`.
"""

from __future__ import annotations

from mellow_cli.io.jobs import Job, row


def _decode_all(items: list, decode) -> list[tuple[object, object]]:
    """(decoded, None) or (None, AudioError) per item: one bad file never stops the others."""
    from mellow_cli.errors import AudioError

    out = []
    for item in items:
        try:
            out.append((decode(item), None))
        except AudioError as e:
            out.append((None, e))
    return out


def decoded_chunks(items: list, decode, size: int):
    """Yield (items, decoded) chunk by chunk, decoding chunk i+1 on a worker thread while the
    caller runs the model on chunk i. At most two chunks of audio are in memory at once."""
    from concurrent.futures import ThreadPoolExecutor

    chunks = [items[i : i + size] for i in range(0, len(items), size)]
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_decode_all, chunks[0], decode) if chunks else None
        for i, chunk in enumerate(chunks):
            decoded = pending.result()
            pending = pool.submit(_decode_all, chunks[i + 1], decode) if i + 1 < len(chunks) else None
            yield chunk, decoded


def answer_in_batches(model, items: list, decode, batch_size: int, pose, options):
    """(item, result, error) per item, in order, `batch_size` items at a time; the next batch's
    audio decodes meanwhile. `decode(item)` gives the item's (clip1, clip2 or None) or raises an
    AudioError, which comes back as `error` (result None) while the others go on. `pose(item)`
    gives (prompt, candidates): candidates None asks for a free answer (result: its text, all of
    a batch's decoded together), else the candidates are scored (result: a ChoiceResult, all of a
    batch's scored together). The one prediction loop of `mellow ask` and the benchmarks."""
    from mellow_cli.api import Question

    for chunk, decoded in decoded_chunks(items, decode, batch_size):
        free, picked = [], []  # (position in the chunk, question[, candidates])
        for i, (item, (clips, err)) in enumerate(zip(chunk, decoded)):
            if err is None:
                prompt, candidates = pose(item)
                question = Question(clips[0], clips[1], prompt)
                if candidates is None:
                    free.append((i, question))
                else:
                    picked.append((i, question, candidates))
        results = [None] * len(chunk)
        if free:
            for (i, _), answer in zip(free, model.ask_batch([q for _, q in free], options)):
                results[i] = answer
        if picked:
            for (i, _, _), chosen in zip(picked, model.choose_batch([q for _, q, _ in picked],
                                                                    [c for _, _, c in picked])):
                results[i] = chosen
        for item, result, (_, err) in zip(chunk, results, decoded):
            yield item, result, err


def answer_rows(model, jobs: list[Job], options, batch_size: int, decode):
    """One (row, error) per job, in order, `batch_size` jobs at a time: free answers decoded
    together, choice questions scored together. A job whose audio failed gets a row with the error."""

    def pose(job: Job):
        return job.question, job.choices

    for job, result, err in answer_in_batches(model, jobs, decode, batch_size, pose, options):
        answer, scores = said(result)
        yield row(job, answer=answer, scores=scores, model=model.name, revision=model.revision,
                  error=err.problem if err else None), err


def said(result) -> tuple[str | None, dict[str, float] | None]:
    """(answer, scores) of a row: a free answer as it is, a choice with each choice's probability
    keyed by the choice (`jq .scores.yes`; the order is the row's `choices`)."""
    if result is None or isinstance(result, str):
        return result, None
    return result.choice, {s.text: round(p, 6) for s, p in zip(result.scores, result.probabilities)}
