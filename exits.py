"""
Exit policies: at a head, should the newest token leave now?

The decoding loop (`adadecode.generate_ada`) and the simulator (`simulate.py`) ask the
same questions of the same policy object, so a policy studied in the simulator behaves
the same way in the real loop:

    policy.reset()               a new generation starts
    policy.active(layer)         is the head after `layer` worth checking now? (a check costs time;
                                 layer 0 is the context's own exit, free: context_guess)
    policy.exit(layer, guess)    exit with guess.token?  (guess: heads.Guess, with its context: in_context)
    policy.dry(layer)            only rehearse that exit? (scored against the final layer, not taken)
    policy.observe(layer, ok)    the verdict on an early token from `layer`, or on a rehearsed one
    policy.acts(layer)           may it ever exit at `layer`? (optional; no side effects: the loop
                                 runs straight through the heads where it may not, in one call)

A policy only decides *when* to guess; verification keeps the output exactly greedy's
whatever it says. A head set may carry its tuned policy (`spec()`), and `from_spec`
rebuilds it:

    policy = from_spec(heads.meta["policy"])      # or Threshold(0.75), Guard(Logistic(...)), ...
"""
import math

from heads import Guess
from model import InputError

FEATURES = ("p1", "margin", "entropy", "lse", "echo", "clash")   # what Logistic reads from a Guess, in this order
LONGEST = 4                                     # the longest repeated suffix lookup() looks for
CONTEXT = 0                                     # the context's own exit, before layer 1 (context_guess)


def lookup(tokens, longest=LONGEST):
    """What the context says comes next (prompt lookup): find the most recent earlier place
    where the context's last k tokens occurred, for the largest k <= `longest` that occurs,
    and return (the token that followed them there, k); (None, 0) if the last token is new.
    On code a head's guess that equals this token is right far more often than its
    probability alone says (README, "Choosing exits"). One pass over the context."""
    n, best, k_best = len(tokens), None, 0
    for s in range(n - 2, -1, -1):                # s: the last token of an earlier occurrence
        if tokens[s] != tokens[-1]:
            continue
        k = 1
        while k < longest and k <= s and tokens[s - k] == tokens[n - 1 - k]:
            k += 1
        if k > k_best:
            best, k_best = tokens[s + 1], k
            if k == longest:
                break
    return best, k_best


def in_context(guess, found):
    """The guess with its context features, from found = lookup(the tokens so far): echo = k
    when the guess is the token the context predicts, clash = k when it predicts another."""
    token, k = found
    if token is None:
        return guess
    return guess._replace(echo=k, clash=0) if guess.token == token else guess._replace(echo=0, clash=k)


def context_guess(found):
    """The context as an exit "head" at layer 0 (CONTEXT): it guesses lookup's token, with
    echo = k and no probabilities, before any layer has run, so a right guess skips all L
    layers on the critical path and costs no check. This is prompt lookup decoding's draft
    inside AdaDecode's schedule. A policy uses it only where it names layer 0 explicitly."""
    token, k = found
    return None if token is None else Guess(token, 0.0, 0.0, 0.0, 0.0, echo=k, clash=0)


def acts(policy, layer):
    """policy.acts(layer), or True for a policy without it: whether the decoding loop must stop
    at the head after `layer` to ask the policy there."""
    fn = getattr(policy, "acts", None)
    return True if fn is None else fn(layer)


def _per_layer(value, what):
    """A float for every head, or {layer: float} (a head without an entry never exits)."""
    if isinstance(value, dict):
        out = {int(l): float(t) for l, t in value.items()}
    else:
        out = float(value)
    for t in (out.values() if isinstance(out, dict) else [out]):
        if not 0.0 <= t <= 1.0:
            raise InputError(f"{what} must be in [0, 1], got {t}")
    return out


class Threshold:
    """Exit when a confidence feature of the guess is at least the head's threshold:
    feature "p1" is the top-1 probability (the paper's rule), "margin" is p1 - p2 (CALM)."""

    def __init__(self, threshold=0.75, feature="p1"):
        if feature not in ("p1", "margin"):
            raise InputError(f"threshold feature must be p1 or margin, got {feature!r}")
        self.threshold, self.feature = _per_layer(threshold, "threshold"), feature

    def _t(self, layer):
        if isinstance(self.threshold, dict):
            return self.threshold.get(layer)
        return None if layer == CONTEXT else self.threshold      # one number is for the heads only

    def reset(self):
        pass

    def active(self, layer):
        return self._t(layer) is not None

    acts = active

    def exit(self, layer, guess):
        return getattr(guess, self.feature) >= self._t(layer)

    def dry(self, layer):
        return False

    def observe(self, layer, accepted):
        pass

    def spec(self):
        return {"kind": "threshold", "threshold": self.threshold, "feature": self.feature}


class Logistic:
    """A tiny classifier per head: P(the final layer will agree) = sigmoid(w . [1, p1, margin,
    entropy, lse, echo, clash]), fitted on recorded traces (`simulate.py fit`); exit when it
    reaches the head's threshold. It corrects what the shortlist softmax overstates (a
    confident-looking guess whose logits are all low, small lse, has mass outside the
    shortlist) and hears the context: a guess that repeats what followed the last few
    tokens before (echo) is usually right, one that contradicts it (clash) often wrong.
    Weights for the first four features only (an older heads file) leave the context out."""

    def __init__(self, weights, threshold):
        self.weights = {int(l): [float(x) for x in w] for l, w in weights.items()}
        if any(len(w) not in (5, 1 + len(FEATURES)) for w in self.weights.values()):
            raise InputError(f"logistic weights need {1 + len(FEATURES)} numbers per head (or 5, without the context)")
        self.threshold = _per_layer(threshold, "threshold")

    def _t(self, layer):
        return self.threshold.get(layer) if isinstance(self.threshold, dict) else self.threshold

    def prob(self, layer, guess):
        w = self.weights[layer]
        z = w[0] + sum(wi * getattr(guess, f) for wi, f in zip(w[1:], FEATURES))
        return 1.0 / (1.0 + math.exp(-max(min(z, 60.0), -60.0)))

    def reset(self):
        pass

    def active(self, layer):
        return layer in self.weights and self._t(layer) is not None

    acts = active

    def exit(self, layer, guess):
        return self.prob(layer, guess) >= self._t(layer)

    def dry(self, layer):
        return False

    def observe(self, layer, accepted):
        pass

    def spec(self):
        return {"kind": "logistic", "weights": self.weights, "threshold": self.threshold}


class Guard:
    """Wraps a policy and switches a head off while its exits do not pay.

    A right exit at layer l of L saves about L - l layers on the critical path; a wrong
    one wastes about l (its own climb, done again after the rollback) and whatever was
    built on it: break-even is an acceptance rate of b = l / L. A head pays while its
    running acceptance (an exponential average that starts at `prior`) is at least
    b + slack * (1 - b): `slack` of the way from break-even to always right, so a deep
    head, whose break-even is already high, is not held to an impossible bar.

    Below the bar a head is checked only every `probe`-th time it is reached, and its
    would-be exit is *rehearsed*, not taken (`dry`): the loop scores the guess against
    the final layer's token once that is known, and the verdict moves the running
    acceptance as a real one would. So a head that is wrong in this text costs checks,
    never rollbacks, and a head that is right earns its way back without a risk. With
    `prior` below a head's bar the head starts out rehearsing. The defaults (slack 0.3,
    prior 0.5, probe 3) were chosen with the simulator on prompts of six domains and on
    held-out code (README, "Choosing exits")."""

    def __init__(self, policy, n_layers, slack=0.3, alpha=0.2, prior=0.5, probe=3):
        self.policy, self.n_layers = policy, n_layers
        self.slack, self.alpha, self.prior, self.probe = slack, alpha, prior, probe
        self.reset()

    def reset(self):
        self.policy.reset()
        self.rate, self.skipped = {}, {}

    def paying(self, layer):
        b = layer / self.n_layers
        return self.rate.get(layer, self.prior) >= b + self.slack * (1 - b)

    def active(self, layer):
        if not self.policy.active(layer):
            return False
        if self.paying(layer):
            return True
        self.skipped[layer] = self.skipped.get(layer, 0) + 1
        return self.skipped[layer] % self.probe == 0          # an occasional re-probe, rehearsed

    def acts(self, layer):
        return acts(self.policy, layer)

    def exit(self, layer, guess):
        return self.policy.exit(layer, guess)

    def dry(self, layer):
        return not self.paying(layer)

    def observe(self, layer, accepted):
        r = self.rate.get(layer, self.prior)
        self.rate[layer] = r + self.alpha * (float(accepted) - r)
        self.policy.observe(layer, accepted)

    def spec(self):
        return {"kind": "guard", "policy": self.policy.spec(), "slack": self.slack, "alpha": self.alpha,
                "prior": self.prior, "probe": self.probe}


def from_spec(spec, n_layers):
    """Rebuild a policy from its spec() (as stored in a heads file)."""
    try:
        kind = spec["kind"]
        if kind == "threshold":
            return Threshold(spec["threshold"], spec.get("feature", "p1"))
        if kind == "logistic":
            return Logistic(spec["weights"], spec["threshold"])
        if kind == "guard":
            return Guard(from_spec(spec["policy"], n_layers), n_layers, spec["slack"], spec["alpha"], spec["prior"],
                         spec["probe"])
    except InputError:
        raise                                   # already says what is wrong, in one line
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise InputError(f"exit policy spec is malformed ({e!r})")
    raise InputError(f"unknown exit policy kind {kind!r}")
