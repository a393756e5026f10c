"""``presence bench interpret``'s sentences, their voices and the ASR that reads them back.

Parallel sentences written for this bench: everyday call and meeting language, English to
Spanish and Spanish to English, each with a reference translation a person would say. About a
third are long (two or three clauses with commas, 15-30 words) so that a simultaneous
interpreter has something to start on before the speaker ends. The vocabulary stays plain and
free of idioms and digits: the offline translator (Apertium eng-spa) is rough on idioms, and
whisper writes numbers as digits or words at whim, which would cost BLEU for nothing.

Voices: English with piper's bundled voice, Spanish with espeak-ng (``es``, 150 words a minute,
as tests/test_interpreter.py speaks it), both at 48 kHz, synthesised once per process.
The ASR that reads audio back in a language is :func:`transcriber`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from presence.bench.meeting import Clip
    from presence.bot.backends.asr import WhisperTranscriber
    from presence.seams import TTS

LONG_MIN_WORDS, LONG_MAX_WORDS = 15, 30
# espeak-ng's default 175 words a minute: at 150 whisper base read it worse here ("Oficía",
# "lesüe suavemos"), and took 2-4x longer per pass (temperature fallbacks)
ESPEAK_SPEED = 175
CLAUSE_PAUSE_S = 0.3  # espeak-ng runs clauses together (~140 ms at a comma); a speaker pauses


@dataclass(frozen=True)
class Pair:
    source: str
    reference: str
    source_language: str
    target_language: str

    @property
    def direction(self) -> str:
        return f"{self.source_language}-{self.target_language}"

    @property
    def words(self) -> int:
        return len(self.source.split())

    @property
    def long(self) -> bool:
        """Two or more clauses a simultaneous interpreter can start on: a comma, 15-30 words."""
        return "," in self.source and LONG_MIN_WORDS <= self.words <= LONG_MAX_WORDS


def _pairs(source: str, target: str, rows: list[tuple[str, str]]) -> tuple[Pair, ...]:
    return tuple(Pair(s, r, source, target) for s, r in rows)


EN_ES = _pairs(
    "en",
    "es",
    [
        ("Good morning, everyone.", "Buenos días a todos."),
        ("Can you hear me well?", "¿Me oyes bien?"),
        ("I cannot see your screen.", "No puedo ver tu pantalla."),
        ("The meeting starts at noon.", "La reunión empieza al mediodía."),
        ("Please send me the report today.", "Por favor, envíame el informe hoy."),
        ("We need more time for this project.", "Necesitamos más tiempo para este proyecto."),
        ("The client wants a new design.", "El cliente quiere un diseño nuevo."),
        ("I will call you tomorrow morning.", "Te llamaré mañana por la mañana."),
        ("Where is the new office?", "¿Dónde está la oficina nueva?"),
        ("The sound is very bad today.", "El sonido está muy mal hoy."),
        ("Do you have any questions?", "¿Tienes alguna pregunta?"),
        ("The price is too high for us.", "El precio es demasiado alto para nosotros."),
        ("My computer is very slow this week.", "Mi ordenador está muy lento esta semana."),
        ("Now we can talk about the budget.", "Ahora podemos hablar del presupuesto."),
        ("The team finished the work yesterday.", "El equipo terminó el trabajo ayer."),
        ("I agree with you.", "Estoy de acuerdo contigo."),
        ("Thank you for your help.", "Gracias por tu ayuda."),
        ("The train arrives late today.", "El tren llega tarde hoy."),
        ("We have a problem with the server.", "Tenemos un problema con el servidor."),
        ("Can you repeat the last question?", "¿Puedes repetir la última pregunta?"),
        ("The documents are on the table.", "Los documentos están en la mesa."),
        (
            "I read your email this morning, and I think the plan is good, but we need a bigger budget.",
            "Leí tu correo esta mañana y creo que el plan es bueno, pero necesitamos un presupuesto más grande.",
        ),
        (
            "When the meeting ends, please send the notes to the whole team, because some people "
            "could not come today.",
            "Cuando termine la reunión, por favor envía las notas a todo el equipo, porque algunas "
            "personas no pudieron venir hoy.",
        ),
        (
            "The new version of the program is ready, but we still need to test it before we send it "
            "to the client.",
            "La nueva versión del programa está lista, pero todavía tenemos que probarla antes de "
            "enviarla al cliente.",
        ),
        (
            "If the weather is good on Friday, we can have lunch in the garden, and after that we can "
            "visit the new building.",
            "Si hace buen tiempo el viernes, podemos comer en el jardín, y después podemos visitar el "
            "edificio nuevo.",
        ),
        (
            "My manager called me yesterday afternoon, and she asked me to prepare a short presentation "
            "for the next meeting.",
            "Mi jefa me llamó ayer por la tarde y me pidió que preparara una presentación corta para la "
            "próxima reunión.",
        ),
        (
            "The hotel is near the station, so you can walk there in the morning, and you do not need a taxi.",
            "El hotel está cerca de la estación, así que puedes ir andando por la mañana, y no necesitas "
            "un taxi.",
        ),
        (
            "We talked to the customers last week, and most of them like the product, but they want a "
            "lower price.",
            "Hablamos con los clientes la semana pasada, y a la mayoría le gusta el producto, pero "
            "quieren un precio más bajo.",
        ),
        (
            "I am sorry for the delay, my internet connection stopped working, and I had to restart "
            "the computer.",
            "Perdón por el retraso, mi conexión a internet dejó de funcionar y tuve que reiniciar el "
            "ordenador.",
        ),
        (
            "Before we start, I want to thank everyone for coming, because I know that everyone is "
            "very busy this week.",
            "Antes de empezar, quiero dar las gracias a todos por venir, porque sé que todos están muy "
            "ocupados esta semana.",
        ),
        (
            "The children are at school all afternoon, so I can stay longer today, but tomorrow I have "
            "to leave early.",
            "Los niños están en el colegio toda la tarde, así que hoy puedo quedarme más tiempo, pero "
            "mañana tengo que irme temprano.",
        ),
        (
            "Please open the shared document, go to the second page, and write your name next to the "
            "task you want.",
            "Por favor, abre el documento compartido, ve a la segunda página y escribe tu nombre junto "
            "a la tarea que quieres.",
        ),
        (
            "The kitchen on the third floor is closed this week, so we will eat in the small room near "
            "the entrance.",
            "La cocina del tercer piso está cerrada esta semana, así que comeremos en la sala pequeña "
            "cerca de la entrada.",
        ),
    ],
)

ES_EN = _pairs(
    "es",
    "en",
    [
        ("Buenas tardes a todos.", "Good afternoon, everyone."),
        ("¿Me escuchas bien ahora?", "Can you hear me well now?"),
        ("No puedo ver la presentación.", "I can't see the presentation."),
        ("La reunión empieza después de comer.", "The meeting starts after lunch."),
        ("Necesito el informe antes del viernes.", "I need the report before Friday."),
        ("El proyecto va muy bien.", "The project is going very well."),
        ("¿Puedes compartir tu pantalla?", "Can you share your screen?"),
        ("Mañana no puedo venir a la oficina.", "I can't come to the office tomorrow."),
        ("El cliente está muy contento con el trabajo.", "The client is very happy with the work."),
        ("Tenemos que cambiar la fecha de la reunión.", "We have to change the date of the meeting."),
        ("Hoy hace mucho calor en la ciudad.", "It's very hot in the city today."),
        ("¿Dónde están los documentos nuevos?", "Where are the new documents?"),
        ("Voy a enviar el correo esta tarde.", "I'm going to send the email this afternoon."),
        ("La comida del restaurante es muy buena.", "The food at the restaurant is very good."),
        ("Mi compañero está enfermo esta semana.", "My colleague is sick this week."),
        ("Necesitamos una sala más grande.", "We need a bigger room."),
        ("El tren sale muy temprano.", "The train leaves very early."),
        ("Gracias por la información.", "Thank you for the information."),
        ("¿Quién tiene la llave de la oficina?", "Who has the key to the office?"),
        ("El nuevo programa es fácil de usar.", "The new program is easy to use."),
        ("Por favor, cierra la puerta.", "Please close the door."),
        (
            "Ayer hablé con el director del proyecto, y me dijo que el cliente quiere ver los resultados "
            "la próxima semana.",
            "Yesterday I spoke with the project director, and he told me that the client wants to see "
            "the results next week.",
        ),
        (
            "Cuando llegues a la estación, llámame por teléfono, y yo iré a buscarte con el coche.",
            "When you get to the station, call me, and I'll come and pick you up in the car.",
        ),
        (
            "El informe está casi terminado, pero todavía necesito los datos de ventas del último mes.",
            "The report is almost finished, but I still need the sales data from last month.",
        ),
        (
            "Si tienes tiempo esta tarde, podemos revisar el presupuesto juntos, porque hay algunos "
            "gastos que no entiendo.",
            "If you have time this afternoon, we can review the budget together, because there are "
            "some expenses that I don't understand.",
        ),
        (
            "La nueva oficina es muy grande y luminosa, pero está lejos del centro, y el viaje es largo.",
            "The new office is very big and bright, but it's far from the center, and the trip is long.",
        ),
        (
            "Perdona, no te he entendido bien, ¿puedes repetir la última parte más despacio, por favor?",
            "Sorry, I didn't understand you well, can you repeat the last part more slowly, please?",
        ),
        (
            "Los clientes han probado la aplicación, y dicen que funciona bien, aunque quieren más "
            "opciones en el menú.",
            "The customers have tried the application, and they say that it works well, although they "
            "want more options in the menu.",
        ),
        (
            "Antes de terminar la reunión, quiero recordar a todos que el viernes la oficina cierra "
            "antes de lo normal.",
            "Before we end the meeting, I want to remind everyone that on Friday the office closes "
            "earlier than usual.",
        ),
        (
            "Mi hija está enferma hoy, así que voy a trabajar desde casa, pero puedo conectarme a todas "
            "las reuniones.",
            "My daughter is sick today, so I'm going to work from home, but I can join all the meetings.",
        ),
        (
            "El servidor se paró anoche, el equipo técnico lo arregló esta mañana, y ahora todo "
            "funciona otra vez.",
            "The server stopped last night, the technical team fixed it this morning, and now "
            "everything works again.",
        ),
        (
            "Vamos a cambiar el plan del proyecto, porque el cliente necesita la primera parte antes "
            "del verano.",
            "We're going to change the project plan, because the client needs the first part before "
            "the summer.",
        ),
        (
            "Por favor, lee el documento antes de la próxima reunión, y escribe tus preguntas en el "
            "chat del equipo.",
            "Please read the document before the next meeting, and write your questions in the team chat.",
        ),
    ],
)

CORPUS: dict[str, tuple[Pair, ...]] = {"en-es": EN_ES, "es-en": ES_EN}
# Said once per room before the scored sentences (not scored): the first pass loads what the
# interpreter loads on first use, which would otherwise land on sentence one's latency.
WARMUP = {"en": "Hello, can everyone hear me?", "es": "Hola, ¿me oís todos bien?"}


def pairs(direction: str, limit: int | None = None) -> list[Pair]:
    """The direction's pairs ("en-es" or "es-en"), the first ``limit`` of them, in an order
    that mixes short and long ones (every third is long while long ones last)."""
    if direction not in CORPUS:
        raise ValueError(f"unknown direction {direction!r}: one of {', '.join(CORPUS)}")
    short = [p for p in CORPUS[direction] if not p.long]
    long = [p for p in CORPUS[direction] if p.long]
    mixed: list[Pair] = []
    while short or long:
        for bucket in (short, short, long):
            if bucket:
                mixed.append(bucket.pop(0))
    return mixed[:limit] if limit else mixed


# ------------------------------------------------------------------------------ voices
def voice(language: str) -> TTS:
    """The bench's speaker in ``language``: piper (bundled voice) for English, espeak-ng for Spanish."""
    from presence.bot.backends.tts import EspeakTTS, PiperTTS

    if language == "en":
        return PiperTTS()
    if language == "es":
        return ClausePauses(EspeakTTS(voice="es", speed=ESPEAK_SPEED))
    raise ValueError(f"no bench voice for {language!r}")


class ClausePauses:
    """A voice with a speaker's pause between clauses (espeak-ng renders clause by clause)."""

    def __init__(self, tts: TTS, pause_s: float = CLAUSE_PAUSE_S) -> None:
        self.tts = tts
        self.sample_rate = tts.sample_rate
        self.language = tts.language
        self.pause = np.zeros(int(pause_s * tts.sample_rate), dtype=np.float32)

    def synthesize(self, text: str) -> Iterator[np.ndarray]:
        for i, chunk in enumerate(self.tts.synthesize(text)):
            if i:
                yield self.pause
            yield chunk


_CLIPS: dict[tuple[str, str], Clip] = {}


def clips(language: str, texts: list[str]) -> dict[str, Clip]:
    """Each text spoken in ``language`` at 48 kHz (``presence.bench.meeting.Clip``: int16 PCM and
    where its voice begins and ends), synthesised once per process."""
    from presence.bench.meeting import make_clips

    missing = [t for t in dict.fromkeys(texts) if (language, t) not in _CLIPS]
    if missing:
        for text, clip in make_clips(voice(language), missing).items():
            _CLIPS[(language, text)] = clip
    return {t: _CLIPS[(language, t)] for t in texts}


# ------------------------------------------------------------------------------ reading back
@functools.cache
def transcriber(language: str) -> WhisperTranscriber:
    """The whisper that reads speech in ``language`` back, with word times: the interpreter's own
    per-language ASR (``presence.bot.backends.languages.asr_for``: the multilingual base unless
    PRESENCE_MULTILINGUAL_WHISPER_MODEL, or PRESENCE_WHISPER_MODEL for English, says otherwise)."""
    from presence.bot.backends.languages import asr_for
    from presence.config import Settings

    return asr_for(Settings.from_env(None), language)
