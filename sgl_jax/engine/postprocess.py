"""Postprocessing one step's results for one request: the sampled token, the constraint, jump-forward.

`Postprocessor.one(chunk, rows, out)` runs on the engine thread for each chunk of a finished step:
prompt-logprob entries, then the sampled token through the constraint (FSM advance, grammar) and the
output path (`OutputProcessor.append`: stops, length), then the constraint's forced continuation
(`apply_jump`), whose tokens take the same output path and enter the penalty history
(`Scheduler.mark_output`). A finished request is handed to `retire` (the loop's one exit).
Host code, no jax.
"""

from __future__ import annotations


class Postprocessor:
    def __init__(self, output, constraints, scheduler, retire):
        self.output = output
        self.constraints = constraints
        self.scheduler = scheduler
        self.retire = retire

    def one(self, c, rows, out) -> None:
        """Chunk c's results (its logits rows `rows` of the step output `out`)."""
        req, (a, e) = c.req, rows
        d = req.data
        if d.prep.return_logprob and c.logits_from is not None:
            self.output.collect_input_logprobs(req, c, a, e, out["target_logprobs"], out["top_ids"],
                                               out["top_logprobs"])
        if not c.samples:
            if not req.wants_sample and req.num_computed >= req.num_tokens:
                d.finish_reason = {"type": "length", "length": 0}
                self.retire(req)
            return
        tok = int(out["tokens"][e - 1])
        lp = out["logprobs"][e - 1] if d.prep.return_logprob else None
        top = (out["top_ids"][e - 1], out["top_logprobs"][e - 1]) if d.prep.top_logprobs_num else None
        reason = self.constraints.on_sampled(req, tok, int(out["next_state"][e - 1]))
        if reason is None or reason.pop("grammar_end", False):
            self.output.append(req, tok, lp, top)  # the token's text counts (a grammar's last token)
            if reason is not None:
                self.output.finish(req, reason)
        else:
            self.output.append(req, tok, lp, top, check=False)
            self.output.finish(req, reason)
        if d.finish_reason is None:
            self.jump_forward(req)
        if d.finish_reason is not None:
            self.retire(req)
            return
        self.constraints.after_step(req)
        if d.stream:
            self.output.emit(req, final=False)

    def jump_forward(self, req) -> None:
        jump = self.constraints.plan_jump(req)
        if jump is not None:
            self.apply_jump(req, jump)

    def apply_jump(self, req, jump) -> None:
        """Append a forced run through the output path (stops, length) and the penalty history."""
        first_pos = req.num_tokens - jump.take_back
        if jump.take_back:
            self.output.truncate(req, jump.take_back)
            self.constraints.take_back(req, jump.take_back)
        appended = []
        for tok in jump.tokens:
            self.output.append(req, tok, None, None, forced=True)
            appended.append(tok)
            if req.data.finish_reason is not None:
                break
        req.data.forced_tokens -= jump.take_back  # counted: net tokens the jump added
        self.constraints.after_forced(req, jump.states[:len(appended)])
        req.num_computed = min(req.num_computed, first_pos)
        self.scheduler.mark_output(req, appended, rebuild=jump.take_back > 0)
