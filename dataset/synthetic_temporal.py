"""The synthetic *temporal* suite: long clips (4-60 s, low frame rate) with 1-6 events on a timeline.

Same jsonl schema as dataset/synthetic.py (docs/data-format.md); colours, shapes, masks, canvas and
mp4 writing come from there. Each video holds one or two objects (two lanes, top and bottom, so they
never overlap) and a timeline of events that never overlap in time:

  appear   the object becomes visible            leave   it is visible for the last time
  move     it travels left or right and stops     bounce  it travels and reverses at a wall N times
  hop      it jumps up and back down N times      turn    it changes colour
  needle   in some long videos, an object shown for only 1-2 s at a random time

Times. Frame i is at i / fps seconds; every event starts and ends on a grid of whole seconds (2 s
before a 2x speed-up), and a video has grid * k + 1 frames, so reversing or speeding up a clip keeps
every event on the grid, and sampling one frame a second sees every event's first and last frame (a
bounce or hop leg lasts at least a second, so that rate never aliases a repetition away). A span is [time of the event's first frame, time
of its last frame]: for a move, the frames where the object leaves its start and reaches its end. With
offset_share, some training videos are read as windows of a longer recording: frame i is at t0 + i / fps
on the clock of their text, and the record's "time_offset" says t0, so that times are learnt from the
frames' clock, not from where a token sits in the sequence.

Question kinds (the record's `category`) and their answer formats:

  order         "the blue circle appears" (an event phrase: the object, then appears / leaves /
                moves left / moves right / bounces / hops / turns <colour> / appears briefly)
  count         a digit: "2" (bounces or hops of one object, or shapes shown in the video)
  speed         an object phrase: "the red square" (colour + shape, the colour it has while moving)
  grounding     a span: "from 3.5 s to 5.0 s" (dataset/timespan.format_span); the record has "span"
  needle_what   an object phrase: "the yellow ring"
  needle_when   a span, with "span"
  reversed      "left" / "right", or "appears" / "leaves": the same question on a clip and on its
                frames reversed (a separate file, both in the data), whose answers differ
  speed_change  a span, with "span": the same question on a clip and on it played 2x fast
  followup      two user turns, the second referring back ("And after that?" -> an event phrase,
                "What colour was it?" -> a colour word "red", "When was it shown?" -> a span)

Objects are named by colour and shape at the moment asked about ("the red square"); shapes and
colours are distinct within a video, so a name is unique. Question wordings live in PHRASINGS:
training uses only the "seen" templates, test records say which set theirs came from ("phrasing").
Held-out (colour, shape, action) combos never occur in training; test videos holding one are
`"subset": "novel_combo"`, the others `"seen"`.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from dataset.metrics import ANSWER_MARKER, duration_bucket
from dataset.synthetic import (COLOURS, PATH_END, PATH_START, SHAPES, blank_canvas, held_out_is_learnable, item_rng,
                               pick, pick_codec, pixel_grid, run_tasks, shape_mask, with_article, write_jsonl, write_mp4)
from dataset.timespan import format_span, format_time

ACTIONS = ("appear", "leave", "move", "bounce", "hop", "turn")
MOTION_KINDS = ("move", "bounce", "hop")
OBJECT_FRACTION = 0.4   # bigger than synthetic.py's: a random tower at 64 px needs the area
LANE_HEIGHTS = (0.27, 0.73)   # centre heights of the top and bottom lane, fraction of the frame
X_STOPS = 3   # resting places across the frame: left wall, centre, right wall
SPEED_CLASSES = (1, 2, 4)   # grid steps to travel half the width; two objects never share one
MAX_REPEATS = 3
# Motion is what most questions need (speed, grounding, reversal); leaving ends an object's story.
EVENT_WEIGHTS = {"appear": 3.0, "leave": 0.7, "move": 3.0, "bounce": 1.5, "hop": 1.5, "turn": 1.0}
EVENT_COUNT_WEIGHTS = (1, 2, 3, 3, 2, 1)   # for 1..6 events
NEEDLE_MIN_SECONDS = 15.0
NEEDLE_SECONDS = (1, 2)
NEEDLE_PROBABILITY = 0.5
TWO_OBJECT_PROBABILITY = 0.6
HIDDEN_START_PROBABILITY = 0.35
PAIR_PROBABILITIES = (("reversed", 0.2), ("sped_up", 0.2))
HELD_OUT_FRACTION = 0.1
NOVEL_TEST_FRACTION = 0.3
HELD_OUT_PHRASING_PROBABILITY = 0.5
ORDER_ANSWERS = ("event", "timeline", "restate")
DEFAULT_ORDER_ANSWERS = "restate"   # measured against "event": docs/findings.md
CAPTION_SFT_SHARE = 0.25   # training conversations that also ask for the caption: SFT keeps "describe it"
MAX_SCENE_TRIES = 500
LENGTHEN_EVERY = 50   # failed draws before a scene gets one grid step longer
# A constant quantiser: x264's crf mode gives slightly different pixels from run to run.
REPRODUCIBLE_X264 = {"qp": "18", "preset": "veryfast"}

# Streams distinct from synthetic.py's (0-6), so both generators can share a seed.
STREAM_HELD_OUT, STREAM_TRAIN_SCENE, STREAM_TEST_SCENE, STREAM_TEST_SPLIT = 20, 21, 22, 23
STREAM_TRAIN_TEXT, STREAM_TEST_TEXT, STREAM_PAIR_TEXT, STREAM_CLOCK = 24, 25, 26, 27

# Question forms: each has a category and two fixed template sets. Placeholders: {event} {other}
# (event phrases), {object} {a} {b} (object phrases), {action} / {actions} (bounce / bounces).
# Held-out wordings use only words of the seen ones, in new orders and pairings: a model that learns
# all its language from this data cannot know what a word it never read means ("precedes" or
# "follows" decides the answer), so a new word would measure luck, not generalisation.
PHRASINGS = {
    "order_after": {"category": "order", "seen": [
        "What happens after {event}?", "What is the next event after {event}?",
        "What does the video show right after {event}?", "Once {event}, what happens next?",
        "After {event}, what happens?", "What happens just after {event}?",
        "What comes after {event}?", "What is the event just after {event}?"],
        "held_out": ["Right after {event}, what happens?", "What is the event that happens next after {event}?"]},
    "order_before": {"category": "order", "seen": [
        "What happens before {event}?", "What is the last event before {event}?",
        "What happens just before {event}?", "Before {event}, what happens?",
        "What does the video show right before {event}?", "What comes before {event}?",
        "What is the event just before {event}?", "Which event comes last before {event}?"],
        "held_out": ["Just before {event}, what happens?", "What is the event right before {event}?"]},
    "order_first": {"category": "order", "seen": [
        "Which happens first: {event} or {other}?", "Which comes earlier: {event} or {other}?",
        "What happens sooner, {event} or {other}?", "Of these two, which is first: {event} or {other}?",
        "Which is first: {event} or {other}?", "Which of the two happens first: {event} or {other}?",
        "Which comes first, {event} or {other}?", "Does {event} or {other} happen first?"],
        "held_out": ["Which of these two comes first: {event} or {other}?", "Which is earlier, {event} or {other}?"]},
    "count_repeats": {"category": "count", "seen": [
        "How many times does {object} {action}?", "How often does {object} {action}?",
        "Count how many times {object} {actions}.", "What is the number of times {object} {actions}?",
        "How many times do you see {object} {action}?", "Count the times {object} {actions}.",
        "How many times does {object} {action} here?", "Give the number of times {object} {actions}."],
        "held_out": ["In total, how many times does {object} {action}?", "How many times in the video does {object} {action}?"]},
    "count_shapes": {"category": "count", "seen": [
        "How many different shapes are shown in the video?", "How many objects appear in the video in total?",
        "How many distinct shapes can be seen?", "Count the shapes that are shown.",
        "What is the number of shapes in the video?", "How many shapes are there in the video?",
        "Count the objects that appear.", "How many objects are shown?"],
        "held_out": ["What is the total number of shapes shown?", "How many different objects can be seen in the video?"]},
    "speed": {"category": "speed", "seen": [
        "Which moves faster, {a} or {b}?", "Which is quicker, {a} or {b}?",
        "Which of the two moves faster: {a} or {b}?", "Is {a} or {b} faster?",
        "Which one is faster, {a} or {b}?", "Which moves more quickly: {a} or {b}?",
        "Does {a} or {b} move faster?", "Of the two, which is faster: {a} or {b}?"],
        "held_out": ["Between {a} and {b}, which is faster?", "Of {a} and {b}, which moves quicker?"]},
    "grounding_action": {"category": "grounding", "seen": [
        "When does {object} {action}?", "At what time does {object} {action}?",
        "During which seconds does {object} {action}?", "Give the time span in which {object} {actions}.",
        "At which times does {object} {action}?", "Tell me when {object} {actions}.",
        "What is the time span in which {object} {actions}?", "When is it that {object} {actions}?"],
        "held_out": ["In which time span does {object} {action}?", "Give the seconds during which {object} {actions}."]},
    "grounding_visible": {"category": "grounding", "seen": [
        "When is {object} visible?", "When can {object} be seen?",
        "During which time is {object} on screen?", "For which span is {object} in view?",
        "At what times is {object} visible?", "When is {object} in view?",
        "Tell me when {object} can be seen.", "Give the span in which {object} is on screen."],
        "held_out": ["In which time span is {object} on screen?", "During which seconds can {object} be seen?"]},
    "needle_what": {"category": "needle_what", "seen": [
        "What appears only briefly?", "Which shape is shown for just a moment?",
        "What object flashes up briefly?", "Something is shown only for a second or two. What is it?",
        "Which object appears only briefly?", "What is shown for just a moment?",
        "Which shape flashes up for a second or two?", "What is on screen only briefly?"],
        "held_out": ["Which object is on screen only for a moment?", "What shape appears just for a second or two?"]},
    "needle_when": {"category": "needle_when", "seen": [
        "When is {object} shown?", "At what time does {object} briefly appear?",
        "During which seconds is {object} on screen?", "When does {object} flash up?",
        "When does {object} briefly appear?", "At what time does {object} flash up?",
        "When is {object} on screen?", "Give the seconds when {object} is shown."],
        "held_out": ["In which span does {object} show up?", "At what time is {object} shown?"]},
    "reversed_direction": {"category": "reversed", "seen": [
        "Which way does {object} move?", "In which direction does {object} move?",
        "Does {object} move left or right?", "What direction does {object} travel?",
        "Which way does {object} go?", "Is {object} moving left or right?",
        "In what direction does {object} go?", "Where does {object} move: left or right?"],
        "held_out": ["Which direction does {object} travel?", "Does {object} travel left or right?"]},
    "reversed_presence": {"category": "reversed", "seen": [
        "Does {object} appear or leave?", "Does {object} enter or leave the scene?",
        "Is {object} appearing or leaving?", "Does {object} come in or go out?",
        "Is {object} entering or leaving the scene?", "Does {object} show up or go away?",
        "Does {object} appear or go out?", "Is {object} coming in or going out?"],
        "held_out": ["Does {object} come in or leave?", "Does {object} enter or go out of the scene?"]},
    "speed_change": {"category": "speed_change", "seen": [
        "From when to when does {object} {action}?", "Between which times does {object} {action}?",
        "Over which seconds does {object} {action}?", "Say when {object} {actions}.",
        "From what time to what time does {object} {action}?", "In which seconds does {object} {action}?",
        "Name the times at which {object} {actions}.", "Between which seconds does {object} {action}?"],
        "held_out": ["Over which times does {object} {action}?", "Say from when to when {object} {actions}."]},
    "first_mover": {"category": "followup", "seen": [
        "Which shape moves first?", "Which shape starts moving first?",
        "What is the first shape to move?", "Which shape is the first to move?",
        "Which object moves first?", "Which shape is first to start moving?",
        "What moves first?", "Which object starts to move first?"],
        "held_out": ["What shape starts moving first?", "Which is the first shape that moves?"]},
    "followup_next": {"category": "followup", "seen": [
        "And after that?", "What happens next?", "Then what?", "And what comes next?",
        "What happens after that?", "And next?", "What comes after that?", "What is next?"],
        "held_out": ["What comes next?", "And then what happens?"]},
    "followup_colour": {"category": "followup", "seen": [
        "What colour was it?", "What colour is it?", "Which colour did it have?", "And its colour?",
        "What colour did it have?", "What colour does it have?", "And what colour was it?", "Tell me its colour."],
        "held_out": ["What was its colour?", "Which colour was it?"]},
    "followup_when": {"category": "followup", "seen": [
        "When was it shown?", "When did it appear?", "At what time was it visible?", "When was it on screen?",
        "When did it show up?", "At what time was it shown?", "When could it be seen?", "And when was it shown?"],
        "held_out": ["At what time did it appear?", "When was it visible?"]},
}
# Training wordings per form (all of them by default; 4, the first ones, was the suite before 8).
SEEN_WORDINGS = min(len(entry["seen"]) for entry in PHRASINGS.values())
CATEGORIES = ("order", "count", "speed", "grounding", "needle_what", "needle_when", "reversed", "speed_change",
              "followup")


# ---------------------------------------------------------------- scene description


@dataclass(frozen=True)
class Settings:
    """How the suite is made: frames a second, frame side in pixels, the seconds a training video
    lasts (min to max) and a test video at most, the encoder, and how many order questions of each
    form a training conversation asks (where the video allows that many), and how order questions are
    answered: "event" (the event alone), "timeline" (the video's timed events first, then
    "Answer: <the event>", which scoring reads) or "restate" (a before / after question's anchor
    first: "after the red square stops. Answer: <the event>."), and how many of each question form's
    training wordings it draws from; and the share of training videos read as a window of a longer
    recording: their clock starts at a whole second t0 > 0, so that their end is at most clock_max
    seconds (the record's "time_offset"), and every time their text gives is on that clock."""
    fps: int = 4
    size: int = 64
    min_seconds: float = 4.0
    max_seconds: float = 60.0          # training videos; test videos go on to test_max_seconds
    test_max_seconds: float = 120.0
    codec: str = "libx264"
    order_questions: int = 1
    order_answers: str = DEFAULT_ORDER_ANSWERS   # one of ORDER_ANSWERS
    seen_wordings: int = SEEN_WORDINGS   # the first this many of each form's seen wordings are used
    offset_share: float = 0.0          # training videos only; the test videos' clocks start at 0
    clock_max: float = 120.0


@dataclass(frozen=True)
class Actor:
    colour: str   # colour at its first frame on screen
    shape: str
    lane: int     # 0 top, 1 bottom
    speed: int    # grid steps per half width of travel
    start_x: int  # index into the X_STOPS resting places
    hidden: bool  # not on screen until its appear (or needle) event
    needle: bool = False


@dataclass(frozen=True)
class Event:
    kind: str
    actor: int
    start: int    # first frame
    end: int      # last frame (== start for instants)
    colour: str   # the actor's colour during the event (before a turn)
    count: int = 0          # bounces or hops
    new_colour: str = ""    # turn
    x_keys: tuple = ()      # ((frame, x stop), ...) of move and bounce
    y_keys: tuple = ()      # ((frame, lane height 0..1), ...) of hop

    @property
    def direction(self) -> str:
        return "right" if self.x_keys[-1][1] > self.x_keys[0][1] else "left"


@dataclass(frozen=True)
class Scene:
    name: str
    frames: int
    fps: int
    grid: int                   # frames per grid step
    actors: tuple
    events: tuple               # in time order
    subset: str | None = None   # test videos only
    pair: str = ""              # "reversed" / "sped_up": one member of a conflicting pair
    source: "Scene | None" = None   # a pair's second member: rendered from this scene's pixels
    clock: float = 0.0          # the time of frame 0 on the clock of the text (a window of a longer recording)

    @property
    def duration(self) -> float:
        return round(self.frames / self.fps, 4)

    def seconds(self, frame: int) -> float:
        return self.clock + frame / self.fps


@dataclass
class PlanStep:
    """One event before it is placed in time: lengths in grid steps."""
    kind: str
    actor: int
    colour: str
    path: tuple = ()   # x stops (move, bounce) or lane heights (hop), at each leg's end points
    legs: tuple = ()   # grid steps per leg
    count: int = 0
    new_colour: str = ""

    @property
    def steps(self) -> int:
        return sum(self.legs)


@dataclass
class ActorState:
    visible: bool
    gone: bool
    x: int
    colour: str


# ---------------------------------------------------------------- held-out combos


def all_combos() -> list:
    return list(itertools.product(COLOURS, SHAPES, ACTIONS))


def choose_held_out(seed: int) -> list:
    combos = all_combos()
    rng = item_rng(seed, STREAM_HELD_OUT)
    while True:
        chosen = rng.choice(len(combos), size=round(HELD_OUT_FRACTION * len(combos)), replace=False)
        held_out = sorted(combos[i] for i in chosen)
        remaining = [c for c in combos if c not in set(held_out)]
        if held_out_is_learnable(held_out, remaining, (COLOURS, SHAPES, ACTIONS)):
            return held_out


def event_combo(event: Event, scene: Scene):
    actor = scene.actors[event.actor]
    return None if actor.needle else (event.colour, actor.shape, event.kind)


def scene_combos(scene: Scene) -> set:
    return {c for c in (event_combo(e, scene) for e in scene.events) if c is not None}


# ---------------------------------------------------------------- planning the timeline


def base_grid(fps: int) -> int:
    """Frames per grid step: one second."""
    return fps


def steps_for_seconds(rng, fps, grid, low, high) -> int:
    """Grid steps K of a video (grid * K + 1 frames) of a log-uniform duration in [low, high]."""
    k_low = math.ceil((low * fps - 1) / grid)
    k_high = max(k_low, math.floor((high * fps - 1) / grid))
    seconds = math.exp(rng.uniform(math.log(low), math.log(high)))
    return int(min(max(round((seconds * fps - 1) / grid), k_low), k_high))


def move_step(rng, index, actor, state) -> PlanStep:
    target = pick(rng, [x for x in range(X_STOPS) if x != state.x])
    return PlanStep("move", index, state.colour, (state.x, target), (abs(target - state.x) * actor.speed,))


def bounce_step(rng, index, actor, state) -> PlanStep:
    """Travel to a wall, reverse there `count` times in all, and stop at the centre."""
    count = int(rng.integers(1, MAX_REPEATS + 1))
    walls = [0, X_STOPS - 1]
    first_wall = pick(rng, [w for w in walls if w != state.x])
    path = [state.x] + [walls[(walls.index(first_wall) + i) % 2] for i in range(count)] + [X_STOPS // 2]
    legs = tuple(abs(b - a) * actor.speed for a, b in zip(path, path[1:]))
    return PlanStep("bounce", index, state.colour, tuple(path), legs, count)


def hop_step(rng, index, actor, state) -> PlanStep:
    count = int(rng.integers(1, MAX_REPEATS + 1))
    leg = max(1, actor.speed // 2)   # a second or two up, as long down: one frame a second sees every hop
    path = (1.0,) + (0.0, 1.0) * count   # bottom lane -> top lane -> back
    return PlanStep("hop", index, state.colour, path, (leg,) * (2 * count), count)


def turn_step(rng, index, state, used_colours) -> PlanStep | None:
    free = [c for c in COLOURS if c not in used_colours]
    return PlanStep("turn", index, state.colour, new_colour=pick(rng, free)) if free else None


def actor_candidates(rng, index, actors, states, used_colours) -> list:
    actor, state = actors[index], states[index]
    if state.gone or actor.needle:
        return []
    if not state.visible:
        return [PlanStep("appear", index, state.colour)]
    candidates = [PlanStep("leave", index, state.colour), move_step(rng, index, actor, state),
                  bounce_step(rng, index, actor, state), turn_step(rng, index, state, used_colours)]
    others_visible = any(s.visible for i, s in enumerate(states) if i != index)
    if actor.lane == 1 and not others_visible:   # a hop passes through the top lane
        candidates.append(hop_step(rng, index, actor, state))
    return [c for c in candidates if c is not None]


def apply_step(step: PlanStep, states, used_colours) -> None:
    state = states[step.actor]
    if step.kind == "appear":
        state.visible = True
    elif step.kind == "leave":
        state.visible, state.gone = False, True
    elif step.kind in ("move", "bounce"):
        state.x = step.path[-1]
    elif step.kind == "turn":
        state.colour = step.new_colour
        used_colours.add(step.new_colour)


def sample_plan(rng, actors, n_events, budget, allowed) -> list:
    """Events one after another, each feasible in the state the earlier ones leave; `budget` is in grid
    steps and pays for each event's length plus a one-step gap before it."""
    states = [ActorState(not a.hidden, False, a.start_x, a.colour) for a in actors]
    used_colours = {a.colour for a in actors}
    plan = []
    while len(plan) < n_events:
        gap = 1 if plan else 0
        candidates = [c for i in range(len(actors)) for c in actor_candidates(rng, i, actors, states, used_colours)
                      if c.steps + gap <= budget
                      and (allowed is None or (c.colour, actors[i].shape, c.kind) in allowed)]
        if not candidates:
            break
        weights = np.array([EVENT_WEIGHTS[c.kind] for c in candidates])
        step = candidates[int(rng.choice(len(candidates), p=weights / weights.sum()))]
        budget -= step.steps + gap
        apply_step(step, states, used_colours)
        plan.append(step)
    return plan


def place_plan(rng, plan, total_steps) -> list:
    """Start step of each event: at least one step apart, inside (0, total_steps), spare steps spread at random."""
    spare = total_steps - 2 - sum(s.steps for s in plan) - (len(plan) - 1)
    cuts = np.sort(rng.integers(0, spare + 1, size=len(plan)))
    extras = np.diff(np.concatenate([[0], cuts]))
    starts, cursor = [], 1
    for step, extra in zip(plan, extras):
        cursor += int(extra)
        starts.append(cursor)
        cursor += step.steps + 1
    return starts


def keyframes(step: PlanStep, start_frame: int, grid: int) -> tuple:
    frames = [start_frame]
    for leg in step.legs:
        frames.append(frames[-1] + leg * grid)
    return tuple(zip(frames, step.path))


def event_from_step(step: PlanStep, start_step: int, grid: int) -> Event:
    start = start_step * grid
    end = start + step.steps * grid
    keys = keyframes(step, start, grid) if step.path else ()
    x_keys = keys if step.kind in ("move", "bounce") else ()
    y_keys = keys if step.kind == "hop" else ()
    return Event(step.kind, step.actor, start, end, step.colour, step.count, step.new_colour, x_keys, y_keys)


# ---------------------------------------------------------------- scenes


def sample_actors(rng, n_main, with_needle, target=None) -> tuple:
    """Distinct colours, shapes and speeds; the first actor takes the bottom lane, any other the top.
    `target` (a held-out combo) gives the first actor its colour and shape."""
    n_actors = n_main + int(with_needle)
    colours = [list(COLOURS)[i] for i in rng.permutation(len(COLOURS))]
    shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))]
    if target is not None:
        colours.remove(target[0])
        shapes.remove(target[1])
        colours, shapes = [target[0]] + colours, [target[1]] + shapes
    speeds = rng.permutation(SPEED_CLASSES)
    actors = []
    for i in range(n_actors):
        needle = with_needle and i == n_actors - 1
        hidden = needle or bool(rng.random() < HIDDEN_START_PROBABILITY)
        if target is not None and i == 0:
            hidden = target[2] == "appear"
        actors.append(Actor(colours[i], shapes[i], 1 if i == 0 else 0, int(speeds[i % len(speeds)]),
                            int(rng.integers(X_STOPS)), hidden, needle))
    return tuple(actors)


def needle_step(rng, actors, fps, grid) -> PlanStep:
    index = len(actors) - 1
    seconds = pick(rng, NEEDLE_SECONDS)
    return PlanStep("needle", index, actors[index].colour, legs=(max(1, seconds * fps // grid),))


def plan_scene_events(rng, actors, total_steps, fps, grid, allowed) -> tuple:
    """The whole timeline: main events, plus the needle at a random place among them."""
    n_events = 1 + int(rng.choice(len(EVENT_COUNT_WEIGHTS), p=np.array(EVENT_COUNT_WEIGHTS) / sum(EVENT_COUNT_WEIGHTS)))
    needle = needle_step(rng, actors, fps, grid) if actors[-1].needle else None
    budget = total_steps - 2 - (needle.steps + 1 if needle else 0)
    plan = sample_plan(rng, actors, n_events - (1 if needle else 0), budget, allowed)
    if needle:
        plan.insert(int(rng.integers(len(plan) + 1)), needle)
    starts = place_plan(rng, plan, total_steps)
    return tuple(event_from_step(step, start, grid) for step, start in zip(plan, starts))


def draw_scene(name, rng, settings: Settings, total_steps, grid, allowed, target=None) -> Scene:
    seconds = (total_steps * grid + 1) / settings.fps
    with_needle = seconds >= NEEDLE_MIN_SECONDS and rng.random() < NEEDLE_PROBABILITY
    n_main = 1 if with_needle or rng.random() >= TWO_OBJECT_PROBABILITY else 2
    actors = sample_actors(rng, n_main, with_needle, target)
    events = plan_scene_events(rng, actors, total_steps, settings.fps, grid, allowed)
    return Scene(name, total_steps * grid + 1, settings.fps, grid, actors, events)


def choose_pair(rng, seconds_range) -> str:
    draw = rng.random()
    for pair, probability in PAIR_PROBABILITIES:
        if draw < probability:
            return "" if pair == "sped_up" and seconds_range[1] < 2 * seconds_range[0] else pair
        draw -= probability
    return ""


def make_scene(name, rng, settings: Settings, seconds_range, allowed, target=None, pair=None) -> Scene:
    """One original video; redrawn until it has an event and what its pair or held-out target needs."""
    pair = choose_pair(rng, seconds_range) if pair is None else pair
    low, high = seconds_range
    grid = base_grid(settings.fps) * (2 if pair == "sped_up" else 1)
    total_steps = steps_for_seconds(rng, settings.fps, grid, 2 * low if pair == "sped_up" else low, high)
    longest = max(total_steps, math.floor((high * settings.fps - 1) / grid))
    for attempt in range(MAX_SCENE_TRIES):
        if attempt and attempt % LENGTHEN_EVERY == 0:   # too short for what it must hold: a second longer
            total_steps = min(total_steps + 1, longest)
        scene = replace(draw_scene(name, rng, settings, total_steps, grid, allowed, target), pair=pair)
        if scene.events and (target is None or target in scene_combos(scene)) and (not pair or pair_keys(scene)):
            return scene
    raise RuntimeError(f"could not draw scene {name} (pair {pair!r}, target {target}) in {total_steps} steps")


def reversed_event(event: Event, frames: int) -> Event:
    flip = {"appear": "leave", "leave": "appear"}
    mirrored = lambda keys: tuple((frames - 1 - f, v) for f, v in reversed(keys))  # noqa: E731
    colour, new_colour = (event.new_colour, event.colour) if event.kind == "turn" else (event.colour, "")
    return replace(event, kind=flip.get(event.kind, event.kind), start=frames - 1 - event.end,
                   end=frames - 1 - event.start, colour=colour, new_colour=new_colour,
                   x_keys=mirrored(event.x_keys), y_keys=mirrored(event.y_keys))


def sped_up_event(event: Event) -> Event:
    halved = lambda keys: tuple((f // 2, v) for f, v in keys)  # noqa: E731
    return replace(event, start=event.start // 2, end=event.end // 2,
                   x_keys=halved(event.x_keys), y_keys=halved(event.y_keys))


def pair_member(scene: Scene) -> Scene:
    """The clip's conflicting twin: its frames reversed, or every second frame (2x speed)."""
    if scene.pair == "reversed":
        events = tuple(sorted((reversed_event(e, scene.frames) for e in scene.events), key=lambda e: e.start))
        return replace(scene, name=f"{scene.name}-rev", events=events, source=scene)
    events = tuple(sped_up_event(e) for e in scene.events)
    return replace(scene, name=f"{scene.name}-fast", frames=(scene.frames - 1) // 2 + 1, grid=scene.grid // 2,
                   events=events, source=scene)


# ---------------------------------------------------------------- rendering


@dataclass(frozen=True)
class Track:
    """Per-frame state of one actor; at a turn's frame its left half keeps the old colour."""
    visible: np.ndarray
    x: np.ndarray        # pixels
    y: np.ndarray
    left_colour: list
    right_colour: list


def interpolate(keys, frames: int, initial: float) -> np.ndarray:
    """Piecewise-linear path through the keyframes, resting in between."""
    points = [(0, initial)] + [k for k in keys if k[0] > 0]
    return np.interp(np.arange(frames), [p[0] for p in points], [float(p[1]) for p in points])


def actor_track(scene: Scene, index: int, size: int) -> Track:
    actor = scene.actors[index]
    events = [e for e in scene.events if e.actor == index]
    visible = np.full(scene.frames, not actor.hidden)
    left, right = [actor.colour] * scene.frames, [actor.colour] * scene.frames
    for event in events:
        if event.kind == "appear":
            visible[:event.start] = False
            visible[event.start:] = True
        elif event.kind == "leave":
            visible[event.end + 1:] = False
        elif event.kind == "needle":
            visible[event.start:event.end + 1] = True
        elif event.kind == "turn":
            left[event.start + 1:] = [event.new_colour] * (scene.frames - event.start - 1)
            right[event.start:] = [event.new_colour] * (scene.frames - event.start)
    x_keys = [k for e in events for k in e.x_keys]
    y_keys = [k for e in events for k in e.y_keys]
    stop_span = (PATH_END - PATH_START) / (X_STOPS - 1)
    x = (PATH_START + stop_span * interpolate(x_keys, scene.frames, actor.start_x)) * size
    top, bottom = LANE_HEIGHTS
    y = (top + (bottom - top) * interpolate(y_keys, scene.frames, actor.lane)) * size
    return Track(visible, x, y, left, right)


def render_original(scene: Scene, size: int) -> np.ndarray:
    xs, ys = pixel_grid(size)
    diameter = OBJECT_FRACTION * size
    tracks = [actor_track(scene, i, size) for i in range(len(scene.actors))]
    video = np.empty((scene.frames, size, size, 3), dtype=np.uint8)
    for frame in range(scene.frames):
        canvas = blank_canvas(size)
        for actor, track in zip(scene.actors, tracks):
            if not track.visible[frame]:
                continue
            mask = shape_mask(actor.shape, (track.x[frame], track.y[frame]), diameter, xs, ys)
            left_half = xs < track.x[frame]
            canvas[mask & left_half] = COLOURS[track.left_colour[frame]]
            canvas[mask & ~left_half] = COLOURS[track.right_colour[frame]]
        video[frame] = canvas
    return video


def render_scene(scene: Scene, size: int) -> np.ndarray:
    """A pair's second member is the first one's pixels, reversed or every second frame."""
    if scene.source is None:
        return render_original(scene, size)
    pixels = render_original(scene.source, size)
    return pixels[::-1].copy() if scene.pair == "reversed" else pixels[::2].copy()


def write_video(task) -> None:
    """Worker entry point: render one scene and write its mp4."""
    scene, path, settings = task
    write_mp4(path, render_scene(scene, settings.size), settings.fps, settings.codec, REPRODUCIBLE_X264)


def write_all_videos(out_dir: Path, scenes, settings: Settings, workers: int) -> None:
    (out_dir / "videos").mkdir(parents=True, exist_ok=True)
    # Longest first, so no long clip is left to run alone at the end.
    tasks = sorted(((s, out_dir / video_path(s), settings) for s in scenes), key=lambda t: -t[0].frames)
    run_tasks(write_video, tasks, workers, chunksize=4)


def video_path(scene: Scene) -> str:
    return f"videos/{scene.name}.mp4"


# ---------------------------------------------------------------- language


@dataclass(frozen=True)
class Question:
    form: str                 # a key of PHRASINGS
    fills: dict               # the template's placeholders
    answer: str
    span: tuple | None = None
    opener: "Question | None" = None   # followups: the earlier question the last one refers to

    @property
    def category(self) -> str:
        return PHRASINGS[self.form]["category"]


VERBS = {"move": ("move", "moves"), "bounce": ("bounce", "bounces"), "hop": ("hop", "hops")}
CAPTION_PROMPTS = ("Describe what happens in the video, with times.", "List the events of the video with their times.",
                   "What happens in the video, and when?")


def object_name(scene: Scene, event: Event) -> str:
    return f"the {event.colour} {scene.actors[event.actor].shape}"


def event_phrase(scene: Scene, event: Event) -> str:
    name = object_name(scene, event)
    verb = {"appear": "appears", "leave": "leaves", "bounce": "bounces", "hop": "hops", "needle": "appears briefly",
            "move": f"moves {event.direction}" if event.x_keys else "", "turn": f"turns {event.new_colour}"}
    return f"{name} {verb[event.kind]}"


def actor_events(scene: Scene, index: int, kinds=None) -> list:
    return [e for e in scene.events if e.actor == index and (kinds is None or e.kind in kinds)]


def anchor_phrase(scene: Scene, event: Event, relation: str) -> str:
    """A move is referred to by its end ("stops") after it and by its start before it, where that is unambiguous."""
    if event.kind == "move" and len(actor_events(scene, event.actor, ("move",))) == 1:
        return f"{object_name(scene, event)} {'stops' if relation == 'after' else 'starts moving'}"
    return event_phrase(scene, event)


def unique_event_indices(scene: Scene) -> set:
    phrases = [event_phrase(scene, e) for e in scene.events]
    return {i for i, p in enumerate(phrases) if phrases.count(p) == 1}


def event_span(scene: Scene, event: Event) -> tuple:
    return (scene.seconds(event.start), scene.seconds(event.end))


def span_answer(span) -> str:
    return format_span(*span)


def ever_visible(scene: Scene, index: int) -> bool:
    return bool(actor_events(scene, index)) or not scene.actors[index].hidden


def visible_span(scene: Scene, index: int) -> tuple:
    appear, leave = actor_events(scene, index, ("appear",)), actor_events(scene, index, ("leave",))
    first = appear[0].start if appear else 0
    last = leave[0].end if leave else scene.frames - 1
    return (scene.seconds(first), scene.seconds(last))


def timed_motion_events(scene: Scene) -> list:
    """Motion events that "when does X <verb>?" names unambiguously."""
    chosen = []
    for event in scene.events:
        if event.kind not in MOTION_KINDS:
            continue
        rivals = MOTION_KINDS if event.kind == "move" else (event.kind,)
        if len(actor_events(scene, event.actor, rivals)) == 1:
            chosen.append(event)
    return chosen


def action_fills(scene: Scene, event: Event) -> dict:
    action, actions = VERBS[event.kind]
    return {"object": object_name(scene, event), "action": action, "actions": actions}


# ---------------------------------------------------------------- questions


def order_answer(answers: str, answer: str, timeline: str = "", restated: str = "") -> str:
    """An order answer as `answers` says: the event alone; the video's timed events (its caption) first;
    or, for a before / after question, its anchor restated first ("after the red square stops"). The
    reasoned forms end with the marker and the event, which scoring reads."""
    if answers == "timeline":
        return f"{timeline} {ANSWER_MARKER} {answer}."
    if answers == "restate" and restated:
        return f"{restated}. {ANSWER_MARKER} {answer}."
    return answer


def anchored_question(scene: Scene, relation: str, anchor: int, answer: int, answers: str, timeline="") -> Question:
    """ "What happens {relation} <the anchor event>?", answered with the event next to it that way."""
    anchor_text = anchor_phrase(scene, scene.events[anchor], relation)
    return Question(f"order_{relation}", {"event": anchor_text},
                    order_answer(answers, event_phrase(scene, scene.events[answer]), timeline,
                                 f"{relation} {anchor_text}"))


def order_questions(scene: Scene, rng, answers: str = DEFAULT_ORDER_ANSWERS) -> dict:
    events, unique = scene.events, unique_event_indices(scene)
    if len(events) < 3:
        return {}
    phrase = lambda i: event_phrase(scene, events[i])  # noqa: E731
    timeline = caption(scene) if answers == "timeline" else ""
    after = [anchored_question(scene, "after", i, i + 1, answers, timeline)
             for i in range(len(events) - 1) if {i, i + 1} <= unique]
    before = [anchored_question(scene, "before", i, i - 1, answers, timeline)
              for i in range(1, len(events)) if {i, i - 1} <= unique]
    first = []
    for i, j in itertools.combinations(sorted(unique), 2):
        shown = (phrase(i), phrase(j)) if rng.random() < 0.5 else (phrase(j), phrase(i))
        first.append(Question("order_first", {"event": shown[0], "other": shown[1]}, order_answer(answers, phrase(i),
                                                                                                   timeline)))
    return {"order_after": after, "order_before": before, "order_first": first}


def count_questions(scene: Scene) -> dict:
    repeats = [e for e in scene.events if e.kind in ("bounce", "hop")
               and len(actor_events(scene, e.actor, (e.kind,))) == 1]
    shown = sum(ever_visible(scene, i) for i in range(len(scene.actors)))
    return {"count_repeats": [Question("count_repeats", action_fills(scene, e), str(e.count)) for e in repeats],
            "count_shapes": [Question("count_shapes", {}, str(shown))]}


def speed_questions(scene: Scene, rng) -> dict:
    movers = {}
    for event in scene.events:
        if event.kind in ("move", "bounce"):
            movers.setdefault(event.actor, event)
    options = []
    for first, second in itertools.combinations(sorted(movers), 2):
        names = [object_name(scene, movers[first]), object_name(scene, movers[second])]
        faster = names[0] if scene.actors[first].speed < scene.actors[second].speed else names[1]
        if rng.random() < 0.5:
            names.reverse()
        options.append(Question("speed", {"a": names[0], "b": names[1]}, faster))
    return {"speed": options}


def grounding_questions(scene: Scene) -> dict:
    action = [Question("grounding_action", action_fills(scene, e), span_answer(event_span(scene, e)),
                       event_span(scene, e)) for e in timed_motion_events(scene)]
    visible = []
    for index, actor in enumerate(scene.actors):
        events = actor_events(scene, index)
        if actor.needle or not ever_visible(scene, index) or any(e.kind == "turn" for e in events):
            continue
        span = visible_span(scene, index)
        name = object_name(scene, events[0]) if events else f"the {actor.colour} {actor.shape}"
        visible.append(Question("grounding_visible", {"object": name}, span_answer(span), span))
    return {"grounding_action": action, "grounding_visible": visible}


def needle_questions(scene: Scene) -> dict:
    needles = [e for e in scene.events if e.kind == "needle"]
    if not needles:
        return {}
    needle = needles[0]
    name, span = object_name(scene, needle), event_span(scene, needle)
    return {"needle_what": [Question("needle_what", {}, name)],
            "needle_when": [Question("needle_when", {"object": name}, span_answer(span), span)]}


def followup_questions(scene: Scene, order_answers: str = DEFAULT_ORDER_ANSWERS) -> dict:
    """Follow-ups and their openers. An opener is answered as a lone order question would be, except that
    it never tells the timeline: no test question may be asked with the true timed events above it."""
    events, unique = scene.events, unique_event_indices(scene)
    phrase = lambda i: event_phrase(scene, events[i])  # noqa: E731
    opener_answers = "event" if order_answers == "timeline" else order_answers
    chained = [Question("followup_next", {}, phrase(i + 2), opener=anchored_question(scene, "after", i, i + 1,
                                                                                     opener_answers))
               for i in range(len(events) - 2) if {i, i + 1, i + 2} <= unique]
    colour = []
    motions = [e for e in events if e.kind in MOTION_KINDS]
    if motions and sum(ever_visible(scene, i) for i in range(len(scene.actors))) >= 2:
        first = motions[0]
        opener = Question("first_mover", {}, f"the {scene.actors[first.actor].shape}")
        colour.append(Question("followup_colour", {}, first.colour, opener=opener))
    when = [Question("followup_when", q.fills, q.answer, q.span, opener=Question("needle_what", {}, q.fills["object"]))
            for q in needle_questions(scene).get("needle_when", [])]
    return {"followup_next": chained, "followup_colour": colour, "followup_when": when}


def question_options(scene: Scene, rng, order_answers: str = DEFAULT_ORDER_ANSWERS) -> dict:
    """Every form's candidate questions about the scene (pair forms aside), form -> [Question]; order
    questions answered as order_answers says (a followup's opener never through the timeline)."""
    options = {}
    for found in (order_questions(scene, rng, order_answers), count_questions(scene), speed_questions(scene, rng),
                  grounding_questions(scene), needle_questions(scene), followup_questions(scene, order_answers)):
        options.update({form: questions for form, questions in found.items() if questions})
    return options


def pair_keys(scene: Scene) -> list:
    """(form, actor, event kind) of the questions whose answers differ between the pair's members."""
    if scene.pair == "sped_up":
        return [("speed_change", e.actor, e.kind) for e in timed_motion_events(scene)]
    keys = []
    for index, actor in enumerate(scene.actors):
        motions = actor_events(scene, index, MOTION_KINDS)
        if len(motions) == 1 and motions[0].kind == "move":
            keys.append(("reversed_direction", index, "move"))
        presence = actor_events(scene, index, ("appear", "leave"))
        if len(presence) == 1 and not actor.needle:
            keys.append(("reversed_presence", index, presence[0].kind))
    return keys


def pair_question(scene: Scene, key) -> Question:
    """The pair question of `key` (from the pair's original) asked of either member."""
    form, index, kind = key
    if form == "speed_change":
        event = actor_events(scene, index, (kind,))[0]
        span = event_span(scene, event)
        return Question(form, action_fills(scene, event), span_answer(span), span)
    if form == "reversed_direction":
        event = actor_events(scene, index, ("move",))[0]
        return Question(form, {"object": object_name(scene, event)}, event.direction)
    event = actor_events(scene, index, ("appear", "leave"))[0]
    return Question(form, {"object": object_name(scene, event)}, "appears" if event.kind == "appear" else "leaves")


# ---------------------------------------------------------------- captions and records


def times_phrase(count: int) -> str:
    return f"{count} time{'s' if count != 1 else ''}"


def event_sentence(scene: Scene, event: Event) -> str:
    name = object_name(scene, event)
    name = name[0].upper() + name[1:]
    at, span = format_time(scene.seconds(event.start)), format_span(*event_span(scene, event))
    sentences = {
        "appear": f"{name} appears at {at}.",
        "leave": f"{name} leaves at {format_time(scene.seconds(event.end))}.",
        "move": f"{name} moves {event.direction if event.x_keys else ''} {span}.",
        "bounce": f"{name} bounces {times_phrase(event.count)} {span}.",
        "hop": f"{name} hops {times_phrase(event.count)} {span}.",
        "turn": f"{name} turns {event.new_colour} at {at}.",
        "needle": f"{with_article(f'{event.colour} {scene.actors[event.actor].shape}')} is shown briefly {span}.",
    }
    return sentences[event.kind]


def opening_sentence(scene: Scene) -> str:
    """Who is on screen at the first frame, named by their colour then."""
    names = []
    for index, actor in enumerate(scene.actors):
        events = actor_events(scene, index)
        on_screen = events[0].kind not in ("appear", "needle") if events else not actor.hidden
        if on_screen:
            names.append(f"the {events[0].colour if events else actor.colour} {actor.shape}")
    if not names:
        return f"At {format_time(scene.seconds(0))} the screen is empty."
    return f"At {format_time(scene.seconds(0))} {' and '.join(names)} {'is' if len(names) == 1 else 'are'} on screen."


def caption(scene: Scene) -> str:
    return " ".join([opening_sentence(scene)] + [event_sentence(scene, e) for e in scene.events])


def forms_asked(question: Question) -> list:
    return (forms_asked(question.opener) if question.opener else []) + [question.form]


def question_turns(question: Question, rng, phrasing: str, seen_wordings: int = SEEN_WORDINGS) -> list:
    """(user text, answer) pairs; a followup's opener is always worded from the seen set (its first
    seen_wordings)."""
    turns = question_turns(question.opener, rng, "seen", seen_wordings) if question.opener else []
    wordings = PHRASINGS[question.form][phrasing]
    template = pick(rng, wordings[:seen_wordings] if phrasing == "seen" else wordings)
    return turns + [(template.format(**question.fills), question.answer)]


def conversation(turn_pairs) -> list:
    turns = []
    for index, (text, answer) in enumerate(turn_pairs):
        turns.append({"role": "user", "content": f"<video>\n{text}" if index == 0 else text})
        turns.append({"role": "assistant", "content": answer})
    return turns


def base_record(record_id: str, scene: Scene, turn_pairs, category: str) -> dict:
    record = {"id": record_id, "video": video_path(scene), "conversations": conversation(turn_pairs),
              "category": category, "duration": scene.duration}
    if scene.clock:
        record["time_offset"] = scene.clock
    return record


def clock_start(seed: int, index: int, scene: Scene, settings: Settings) -> float:
    """A training video's t0 (0, or with probability offset_share a whole second up to clock_max - duration),
    from a stream of its own, so that the other draws do not move; a pair's members share the draw."""
    if not settings.offset_share:
        return 0.0
    rng = np.random.default_rng([seed, STREAM_CLOCK, index])
    windowed, where = rng.random() < settings.offset_share, rng.random()
    latest = math.floor(settings.clock_max - scene.duration)
    return float(1 + math.floor(where * latest)) if windowed and latest >= 1 else 0.0


def text_rng(seed: int, stream: int, index: int, member: bool) -> np.random.Generator:
    return np.random.default_rng([seed, stream, index, int(member)])


def pair_draw(seed: int, split_stream: int, index: int) -> tuple:
    """The pair question's key choice, wording set and template, shared by both members."""
    rng = np.random.default_rng([seed, STREAM_PAIR_TEXT, split_stream, index])
    phrasing = "held_out" if rng.random() < HELD_OUT_PHRASING_PROBABILITY else "seen"
    return float(rng.random()), phrasing, int(rng.integers(1 << 30))


def pair_record_question(scene: Scene, original: Scene, draw) -> Question:
    keys = pair_keys(original)
    return pair_question(scene, keys[int(draw[0] * len(keys))])


def training_questions(options: dict, rng, order_questions: int) -> list:
    """One question of each form, or up to order_questions distinct ones of each order form
    (at 1, every form goes through pick, so the default data keeps its random draws)."""
    questions = []
    for form, candidates in options.items():
        if order_questions > 1 and PHRASINGS[form]["category"] == "order":
            questions += [candidates[i] for i in sorted(rng.permutation(len(candidates))[:order_questions])]
        else:
            questions.append(pick(rng, candidates))
    return questions


def timeline_last(units: list, timeline: str) -> list:
    """The units with an answer that tells the timeline after all others, each group in its order: no
    question is trained with the timed events already written above it, as no test question has them."""
    told = lambda unit: any(answer.startswith(timeline) for _, answer in unit)  # noqa: E731
    return [u for u in units if not told(u)] + [u for u in units if told(u)]


def training_records(seed: int, index: int, scene: Scene, original: Scene, settings: Settings = Settings()) -> tuple:
    """The caption sample and the one multi-question conversation of a training video."""
    rng = text_rng(seed, STREAM_TRAIN_TEXT, index, scene is not original)
    scene = replace(scene, clock=clock_start(seed, index, scene, settings))
    prompt, timeline = pick(rng, CAPTION_PROMPTS), caption(scene)
    pretrain = base_record(f"{scene.name}-cap", scene, [(prompt, timeline)], "caption")
    described, described_prompt = rng.random() < CAPTION_SFT_SHARE, pick(rng, CAPTION_PROMPTS)
    questions = training_questions(question_options(scene, rng, settings.order_answers), rng, settings.order_questions)
    units = [question_turns(q, rng, "seen", settings.seen_wordings) for q in questions]
    extra = []
    if original.pair:
        draw = pair_draw(seed, STREAM_TRAIN_TEXT, index)
        extra = [pair_record_question(scene, original, draw)]
        units.append(question_turns(extra[0], np.random.default_rng(draw[2]), "seen", settings.seen_wordings))
    if described:
        units.append([(described_prompt, timeline)])
    units = [units[i] for i in rng.permutation(len(units))]
    if settings.order_answers == "timeline":
        units = timeline_last(units, timeline)
    sft = base_record(f"{scene.name}-multi", scene, [pair for unit in units for pair in unit], "multi")
    sft["_categories"] = ([PHRASINGS[form]["category"] for q in questions + extra for form in forms_asked(q)]
                          + ["caption"] * described)
    return pretrain, sft


def offered_answers(question: Question) -> list | None:
    """The answers a two-way question offers (in the order its wording names them), where the reference is
    one of them: eval.py also ranks them by likelihood. None for open questions and reasoned answers."""
    offered = {"order_first": ("event", "other"), "speed": ("a", "b")}
    fixed = {"reversed_direction": ["left", "right"], "reversed_presence": ["appears", "leaves"]}
    answers = [question.fills[k] for k in offered[question.form]] if question.form in offered \
        else fixed.get(question.form)
    return answers if answers and question.answer in answers else None


def test_record(scene: Scene, question: Question, rng, phrasing: str, seen_wordings: int = SEEN_WORDINGS) -> dict:
    record = base_record(f"{scene.name}-{question.form}", scene,
                         question_turns(question, rng, phrasing, seen_wordings), question.category)
    record.update({"subset": scene.subset, "phrasing": phrasing})
    choices = offered_answers(question)
    if choices:
        record["choices"] = choices
    if question.span is not None:
        record["span"] = [round(question.span[0], 4), round(question.span[1], 4)]
    return record


def test_records(seed: int, index: int, scene: Scene, original: Scene, settings: Settings = Settings()) -> list:
    """One record per question form the video allows, the pair's question included."""
    rng = text_rng(seed, STREAM_TEST_TEXT, index, scene is not original)
    records = []
    for options in question_options(scene, rng, settings.order_answers).values():
        phrasing = "held_out" if rng.random() < HELD_OUT_PHRASING_PROBABILITY else "seen"
        records.append(test_record(scene, pick(rng, options), rng, phrasing, settings.seen_wordings))
    if original.pair:
        draw = pair_draw(seed, STREAM_TEST_TEXT, index)
        question = pair_record_question(scene, original, draw)
        records.append(test_record(scene, question, np.random.default_rng(draw[2]), draw[1], settings.seen_wordings))
    return records


# ---------------------------------------------------------------- the dataset


@dataclass(frozen=True)
class Video:
    """A video to write: an original scene, or a pair's second member, with the original's index."""
    scene: Scene
    original: Scene
    index: int


def with_member(scene: Scene, index: int, allowed) -> list:
    """The scene, and its pair member unless that would show a held-out combo in training."""
    if not scene.pair:
        return [Video(scene, scene, index)]
    member = pair_member(scene)
    if allowed is not None and not scene_combos(member) <= allowed:
        plain = replace(scene, pair="")
        return [Video(plain, plain, index)]
    return [Video(scene, scene, index), Video(member, scene, index)]


def train_videos(seed, n_videos, settings: Settings, allowed) -> list:
    videos = []
    for i in range(n_videos):
        rng = item_rng(seed, STREAM_TRAIN_SCENE, i)
        scene = make_scene(f"v{i:05d}", rng, settings, (settings.min_seconds, settings.max_seconds), allowed)
        videos += with_member(scene, i, allowed)
    return videos


def test_videos(seed, n_test, settings: Settings, allowed, held_out) -> list:
    """Test scenes from their own streams, up to test_max_seconds; a share built around a held-out combo."""
    n_novel = round(NOVEL_TEST_FRACTION * n_test)
    novel = set(item_rng(seed, STREAM_TEST_SPLIT).permutation(n_test)[:n_novel].tolist())
    videos = []
    for i in range(n_test):
        rng = item_rng(seed, STREAM_TEST_SCENE, i)
        target = pick(rng, held_out) if i in novel else None
        scene = make_scene(f"t{i:05d}", rng, settings, (settings.min_seconds, settings.test_max_seconds),
                           None if target else allowed, target)
        for video in with_member(scene, i, None):
            subset = "novel_combo" if scene_combos(video.scene) & set(held_out) else "seen"
            member = replace(video.scene, subset=subset)
            videos.append(Video(member, member if video.scene is video.original else video.original, i))
    return videos


def plan_dataset(seed, n_videos, n_test, settings: Settings) -> tuple:
    """(held-out combos, training videos, test videos): everything generate writes, before any pixel."""
    held_out = choose_held_out(seed)
    allowed = set(all_combos()) - set(held_out)
    return (held_out, train_videos(seed, n_videos, settings, allowed),
            test_videos(seed, n_test, settings, allowed, held_out))


def build_splits(seed, train, test, settings: Settings = Settings()) -> dict:
    pretrain, sft_video, test_lines = [], [], []
    for video in train:
        caption_record, conversation_record = training_records(seed, video.index, video.scene, video.original,
                                                               settings)
        pretrain.append(caption_record)
        sft_video.append(conversation_record)
    for video in test:
        test_lines += test_records(seed, video.index, video.scene, video.original, settings)
    return {"pretrain": pretrain, "sft_video": sft_video, "test": test_lines}


def tally(values) -> dict:
    counts = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return dict(sorted(counts.items()))


def sft_categories(records) -> dict:
    """Questions per category in the training conversations (a followup counts its opener too)."""
    return tally(category for record in records for category in record.pop("_categories"))


def build_meta(seed, held_out, train, test, splits, settings: Settings) -> dict:
    test_lines = splits["test"]
    return {
        "seed": seed,
        "settings": {"fps": settings.fps, "size": settings.size, "min_seconds": settings.min_seconds,
                     "max_seconds": settings.max_seconds, "test_max_seconds": settings.test_max_seconds,
                     "codec": settings.codec, "order_questions": settings.order_questions,
                     "order_answers": settings.order_answers, "seen_wordings": settings.seen_wordings,
                     "offset_share": settings.offset_share, "clock_max": settings.clock_max,
                     "object_diameter": round(OBJECT_FRACTION * settings.size, 3)},
        "counts": {
            "train_videos": len(train), "test_videos": len(test),
            "pairs": tally(v.scene.pair for v in train + test if v.scene.pair and v.scene.source is None),
            **{f"{name}_samples": len(records) for name, records in splits.items()},
        },
        "test_categories": tally(r["category"] for r in test_lines),
        "test_forms": tally(r["id"].rsplit("-", 1)[-1] for r in test_lines),
        "sft_questions_by_category": sft_categories(splits["sft_video"]),
        "train_duration_buckets": tally(duration_bucket(v.scene.duration) for v in train),
        "test_duration_buckets": tally(duration_bucket(v.scene.duration) for v in test),
        "test_phrasing": tally(r["phrasing"] for r in test_lines),
        "test_subsets": tally(r["subset"] for r in test_lines),
        "held_out": [list(c) for c in held_out],
        "actions": list(ACTIONS),
        "phrasings": PHRASINGS,
    }


def generate(out_dir, n_videos, n_test, seed, settings: Settings | None = None, workers=2) -> dict:
    """Write videos/, pretrain.jsonl, sft_video.jsonl, test.jsonl and meta.json under out_dir; return the meta."""
    out_dir = Path(out_dir)
    settings = settings or Settings(codec=pick_codec())
    held_out, train, test = plan_dataset(seed, n_videos, n_test, settings)
    write_all_videos(out_dir, [v.scene for v in train + test], settings, workers)
    splits = build_splits(seed, train, test, settings)
    meta = build_meta(seed, held_out, train, test, splits, settings)   # takes the bookkeeping out of the records
    meta["plan"] = {"n_videos": n_videos, "n_test": n_test}   # with seed and settings: plan_dataset again
    for name, records in splits.items():
        write_jsonl(out_dir / f"{name}.jsonl", records)
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta
