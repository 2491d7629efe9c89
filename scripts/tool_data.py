"""Synthetic tool-use conversations for glm-mini (used by train_tools.py and eval_tools.py).

Deterministic for a seed. Each conversation is a list of OpenAI-style messages plus the tools
offered, rendered by the GLM-5.x chat template:
  * a user request that names the purpose and the argument values (many phrasings per function);
  * the assistant's call `<tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value></tool_call>`,
    thinking off (`<|assistant|></think>`) or on (a short reasoning in `<think>...</think>`);
  * the tool's result (`<|observation|><tool_response>JSON</tool_response>`) and a short final answer
    that uses it;
  * 0-2 other tools offered beside the right one; some conversations need no tool (plain answer),
    some are multi-turn (a second request after the first answer).
Held out for evaluation: whole functions (HELDOUT_FUNCTIONS), the last phrasing template of every
function, and every 4th value of each value pool.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

# ---------------------------------------------------------------- value pools (split train / held out)
CITIES = ["Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Vienna", "Cairo", "Lima", "Oslo", "Dublin",
          "Prague", "Warsaw", "Lisbon", "Athens", "Moscow", "Beijing", "Shanghai", "Seoul", "Delhi", "Mumbai",
          "Sydney", "Toronto", "Chicago", "Boston", "Denver", "Seattle", "Miami", "Dallas", "Houston", "Austin",
          "Phoenix", "Nairobi", "Lagos", "Dakar", "Tunis", "Havana", "Bogota", "Quito", "Santiago", "Montreal",
          "Vancouver", "Helsinki", "Stockholm", "Copenhagen", "Brussels", "Amsterdam", "Zurich", "Geneva", "Milan",
          "Naples", "Venice", "Florence", "Munich", "Hamburg", "Budapest", "Bucharest", "Sofia", "Istanbul",
          "Tehran", "Baghdad", "Karachi", "Bangkok", "Hanoi", "Manila", "Jakarta", "Singapore", "Kyoto", "Osaka",
          "Auckland", "Perth", "Edinburgh", "Glasgow", "Cardiff", "Belfast", "Marseille", "Lyon", "Nice",
          "Porto", "Seville", "Valencia", "Krakow", "Riga", "Tallinn", "Vilnius", "Minsk", "Kiev", "Boston"]
COUNTRIES = ["France", "Spain", "Italy", "Germany", "Japan", "China", "India", "Brazil", "Mexico", "Canada",
             "Egypt", "Kenya", "Peru", "Chile", "Norway", "Sweden", "Finland", "Poland", "Greece", "Turkey",
             "Iran", "Iraq", "Vietnam", "Thailand", "Korea", "Australia", "Ireland", "Portugal", "Austria",
             "Hungary", "Denmark", "Belgium", "Cuba", "Argentina", "Colombia", "Morocco", "Nigeria", "Ghana"]
NAMES = ["Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "Jack", "Karen", "Leo",
         "Maria", "Nina", "Oscar", "Paul", "Quinn", "Rosa", "Sam", "Tina", "Uma", "Victor", "Wendy", "Xavier",
         "Yara", "Zoe", "Hamlet", "Juliet", "Romeo", "Portia", "Viola", "Olivia", "Sebastian", "Miranda",
         "Ophelia", "Horatio", "Duncan", "Banquo", "Helena", "Hermia", "Lysander", "Beatrice", "Benedick"]
WORDS = ["apple", "river", "honour", "candle", "window", "garden", "thunder", "silver", "castle", "shadow",
         "winter", "summer", "mirror", "ladder", "forest", "feather", "harbour", "lantern", "meadow", "marble",
         "velvet", "anchor", "breeze", "crystal", "dagger", "falcon", "goblet", "hammer", "island", "jewel",
         "kettle", "lemon", "needle", "orchard", "pepper", "quarrel", "saddle", "tempest", "valley", "willow"]
TOPICS = ["sports", "science", "music", "politics", "football", "weather", "travel", "business", "health",
          "art", "films", "books", "space", "chess", "cooking", "gardens", "history", "fashion", "markets", "games"]
ARTISTS = ["Mozart", "Bach", "Beethoven", "Chopin", "Vivaldi", "Adele", "Madonna", "Shakira", "Queen", "Abba",
           "Coldplay", "Bowie", "Prince", "Sting", "Bjork", "Verdi", "Handel", "Haydn", "Brahms", "Elgar"]
SYMBOLS = ["AAPL", "MSFT", "GOOG", "AMZN", "TSLA", "META", "NVDA", "IBM", "INTC", "ORCL", "NFLX", "SONY",
           "SAP", "UBER", "SHOP", "ADBE", "CSCO", "PEP", "KO", "NKE", "DIS", "BA", "GE", "F", "GM", "T"]
PHRASES = ["good morning", "thank you", "where is the station", "I love books", "the cat is asleep",
           "see you tomorrow", "how much is it", "the sea is calm", "open the door", "a cup of tea",
           "happy birthday", "the king is dead", "all is well", "good night", "the rain has stopped",
           "we are friends", "time to go", "the moon is bright", "I am hungry", "call me later"]
DISHES = ["pasta", "curry", "soup", "salad", "pancakes", "risotto", "lasagne", "dumplings", "omelette",
          "chili", "paella", "stew", "noodles", "tacos", "pie", "bread", "couscous", "pizza", "sushi", "burgers"]
TITLES = ["Hamlet", "Macbeth", "Othello", "Inception", "Alien", "Jaws", "Vertigo", "Casablanca", "Rocky",
          "Titanic", "Avatar", "Amadeus", "Gladiator", "Psycho", "Heat", "Up", "Cars", "Frozen", "Fargo", "Brave"]
ITEMS = ["umbrella", "laptop", "bicycle", "kettle", "backpack", "lamp", "chair", "guitar", "camera", "printer",
         "teapot", "blanket", "helmet", "scarf", "wallet", "candle", "mirror", "notebook", "pillow", "clock"]
CURRENCIES = ["USD", "EUR", "GBP", "JPY", "CNY", "CHF", "CAD", "AUD", "INR", "SEK"]
LANGUAGES = ["French", "German", "Spanish", "Italian", "Chinese"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
CONDITIONS = ["sunny", "cloudy", "rainy", "windy", "snowy", "foggy", "clear", "stormy"]
HOLDOUT_EVERY = 4


def _split(pool: list, held: bool) -> list:
    """Every HOLDOUT_EVERY-th value is held out ("Paris" is always a training value: the README demo)."""
    pool = list(dict.fromkeys(pool))
    return [v for i, v in enumerate(pool) if (i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1 and v != "Paris") == held]


# ---------------------------------------------------------------- functions
@dataclass
class Param:
    name: str
    type: str  # string | integer | number | boolean
    desc: str
    pool: object  # list of values, or a callable rng, held -> value
    enum: list | None = None
    say: dict | None = None  # value -> how a request says it (booleans)


@dataclass
class Func:
    name: str
    desc: str
    params: list
    asks: list  # request templates; {p} -> the value (or say[value]); the last one is held out
    result: object  # (args, rng) -> dict
    answers: list  # final-answer templates over args + result
    check: list = field(default_factory=list)  # result keys a good final answer mentions


def _int(lo, hi, held_lo=None, held_hi=None):
    def f(rng, held):
        return rng.randint(held_lo, held_hi) if held and held_lo is not None else rng.randint(lo, hi)
    return f


def _num(lo, hi):
    def f(rng, held):
        v = round(rng.uniform(lo, hi) * 2) / 2 if not held else round(rng.uniform(lo, hi), 1)
        return int(v) if v == int(v) else v
    return f


def _time(rng, held):
    return f"{rng.randint(5, 11) if not held else rng.randint(12, 23)}:{rng.choice(['00', '15', '30', '45'])}"


def _tracking(rng, held):
    return "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(2)) + str(rng.randint(1000, 9999))


def _email(rng, held):
    return rng.choice(_split(NAMES, held)).lower() + "@example.com"


BOOL_YES_NO = {True: "yes", False: "no"}

FUNCS = [
    Func("get_weather", "Get the current weather for a city",
         [Param("city", "string", "City name", CITIES)],
         ["What is the weather in {city}?", "What's the weather like in {city}?", "How is the weather in {city} today?",
          "Tell me the weather in {city}.", "weather in {city} please", "Is it sunny in {city} right now?",
          "I am in {city}. What is the weather?", "Can you check the weather for {city}?"],
         lambda a, r: {"city": a["city"], "temperature": r.randint(-5, 35), "condition": r.choice(CONDITIONS)},
         ["It is {condition} in {city}, {temperature}°C.", "The weather in {city} is {condition} with {temperature} degrees.",
          "{city}: {condition}, {temperature}°C."], ["condition", "temperature"]),
    Func("get_forecast", "Get the weather forecast for the next days",
         [Param("city", "string", "City name", CITIES), Param("days", "integer", "Number of days", _int(1, 7, 8, 14))],
         ["What is the forecast for {city} for the next {days} days?", "Give me a {days} day forecast for {city}.",
          "Forecast for {city}, {days} days.", "Will it rain in {city} in the next {days} days? Check the forecast."],
         lambda a, r: {"city": a["city"], "days": a["days"], "summary": r.choice(CONDITIONS)},
         ["The next {days} days in {city} look {summary}.", "Forecast for {city}: mostly {summary}."], ["summary"]),
    Func("convert_currency", "Convert an amount of money from one currency to another",
         [Param("amount", "number", "Amount to convert", _num(1, 500)),
          Param("from_currency", "string", "Currency code to convert from", CURRENCIES),
          Param("to_currency", "string", "Currency code to convert to", CURRENCIES)],
         ["Convert {amount} {from_currency} to {to_currency}.", "How much is {amount} {from_currency} in {to_currency}?",
          "Please change {amount} {from_currency} into {to_currency}.", "What do I get for {amount} {from_currency} in {to_currency}?"],
         lambda a, r: {"result": round(a["amount"] * r.uniform(0.5, 1.5), 2), "currency": a["to_currency"]},
         ["{amount} {from_currency} is {result} {currency}.", "That is {result} {currency}."], ["result"]),
    Func("get_local_time", "Get the current local time in a city",
         [Param("city", "string", "City name", CITIES)],
         ["What time is it in {city}?", "Tell me the local time in {city}.", "What is the time in {city} now?",
          "Do you know the current time in {city}?"],
         lambda a, r: {"city": a["city"], "time": _time(r, False)},
         ["It is {time} in {city}.", "The local time in {city} is {time}."], ["time"]),
    Func("translate_text", "Translate a text into another language",
         [Param("text", "string", "Text to translate", PHRASES),
          Param("target_language", "string", "Language to translate into", LANGUAGES, enum=LANGUAGES)],
         ["Translate \"{text}\" into {target_language}.", "How do you say \"{text}\" in {target_language}?",
          "Please translate \"{text}\" to {target_language}.", "What is \"{text}\" in {target_language}?"],
         lambda a, r: {"translation": "[" + a["target_language"][:2].lower() + "] " + a["text"]},
         ["In {target_language}: {translation}", "The translation is: {translation}"], ["translation"]),
    Func("search_books", "Search the library for books by an author",
         [Param("author", "string", "Author name", NAMES)],
         ["Find books by {author}.", "What books did {author} write?", "Search the library for {author}.",
          "Are there any books by {author}?"],
         lambda a, r: {"count": r.randint(0, 12), "author": a["author"]},
         ["I found {count} books by {author}.", "The library has {count} books by {author}."], ["count"]),
    Func("get_stock_price", "Get the latest stock price for a ticker symbol",
         [Param("symbol", "string", "Ticker symbol", SYMBOLS)],
         ["What is the stock price of {symbol}?", "How much is {symbol} trading at?", "Get me the price of {symbol} stock.",
          "Check the share price for {symbol}."],
         lambda a, r: {"symbol": a["symbol"], "price": round(r.uniform(5, 900), 2)},
         ["{symbol} is trading at {price} dollars.", "The price of {symbol} is {price}."], ["price"]),
    Func("send_email", "Send an email to someone",
         [Param("to", "string", "Email address", _email), Param("subject", "string", "Subject line", WORDS)],
         ["Send an email to {to} with the subject {subject}.", "Email {to}, subject: {subject}.",
          "Please write to {to} about {subject}.", "Send {to} a mail titled {subject}."],
         lambda a, r: {"status": "sent", "to": a["to"]},
         ["The email to {to} was {status}.", "Done, your email was {status}."], ["sent"]),
    Func("set_alarm", "Set an alarm clock",
         [Param("time", "string", "Time as HH:MM", _time),
          Param("repeat", "boolean", "Repeat every day", [True, False], say={True: "every day", False: "just once"})],
         ["Set an alarm for {time}, {repeat}.", "Wake me up at {time} {repeat}.", "I need an alarm at {time}, {repeat}.",
          "Please set my alarm to {time} {repeat}."],
         lambda a, r: {"alarm_id": r.randint(1, 99), "time": a["time"]},
         ["Your alarm is set for {time}.", "Alarm {alarm_id} set for {time}."], ["time"]),
    Func("add_numbers", "Add two integers",
         [Param("a", "integer", "First number", _int(0, 99, 100, 999)), Param("b", "integer", "Second number", _int(0, 99, 100, 999))],
         ["What is {a} plus {b}?", "Add {a} and {b}.", "Please compute {a} + {b}.", "Can you sum {a} and {b} for me?"],
         lambda a, r: {"sum": a["a"] + a["b"]},
         ["{a} plus {b} is {sum}.", "The sum is {sum}."], ["sum"]),
    Func("multiply", "Multiply two numbers",
         [Param("x", "number", "First factor", _num(1, 20)), Param("y", "number", "Second factor", _num(1, 20))],
         ["What is {x} times {y}?", "Multiply {x} by {y}.", "Compute {x} * {y}.", "What do you get if you multiply {x} and {y}?"],
         lambda a, r: {"product": round(a["x"] * a["y"], 3)},
         ["{x} times {y} is {product}.", "The product is {product}."], ["product"]),
    Func("get_population", "Get the population of a country",
         [Param("country", "string", "Country name", COUNTRIES)],
         ["What is the population of {country}?", "How many people live in {country}?", "Population of {country}?",
          "Tell me how many people {country} has."],
         lambda a, r: {"country": a["country"], "population_millions": r.randint(2, 1400)},
         ["{country} has about {population_millions} million people.", "About {population_millions} million people live in {country}."],
         ["population_millions"]),
    Func("find_restaurant", "Find a restaurant in a city",
         [Param("city", "string", "City name", CITIES),
          Param("cuisine", "string", "Kind of food", ["italian", "chinese", "indian", "french", "mexican"],
                enum=["italian", "chinese", "indian", "french", "mexican"])],
         ["Find a {cuisine} restaurant in {city}.", "Where can I eat {cuisine} food in {city}?",
          "I want {cuisine} food in {city}. Any restaurant?", "Recommend a {cuisine} place in {city}."],
         lambda a, r: {"name": r.choice(WORDS).capitalize() + " House", "rating": r.randint(3, 5)},
         ["Try {name} in {city}, rated {rating} stars.", "{name} is a good {cuisine} restaurant in {city}."], ["name"]),
    Func("book_flight", "Book a flight between two cities",
         [Param("origin", "string", "Departure city", CITIES), Param("destination", "string", "Arrival city", CITIES)],
         ["Book a flight from {origin} to {destination}.", "I need to fly from {origin} to {destination}.",
          "Get me a plane ticket from {origin} to {destination}.", "Please book me a flight {origin} to {destination}."],
         lambda a, r: {"flight": "GL" + str(r.randint(100, 999)), "status": "booked"},
         ["Flight {flight} from {origin} to {destination} is {status}.", "You are booked on {flight}."], ["flight"]),
    Func("play_music", "Play music by an artist",
         [Param("artist", "string", "Artist name", ARTISTS)],
         ["Play some {artist}.", "I want to listen to {artist}.", "Put on music by {artist}.", "Could you play {artist} for me?"],
         lambda a, r: {"playing": a["artist"], "track": r.randint(1, 20)},
         ["Now playing {playing}, track {track}.", "Playing music by {playing}."], ["playing"]),
    Func("set_timer", "Start a timer",
         [Param("minutes", "integer", "Length in minutes", _int(1, 60, 61, 120))],
         ["Set a timer for {minutes} minutes.", "Start a {minutes} minute timer.", "Time {minutes} minutes for me.",
          "Can you count down {minutes} minutes?"],
         lambda a, r: {"timer_id": r.randint(1, 50), "minutes": a["minutes"]},
         ["Timer set for {minutes} minutes.", "Your {minutes} minute timer has started."], ["minutes"]),
    Func("get_definition", "Look up the definition of a word",
         [Param("word", "string", "The word", WORDS)],
         ["What does {word} mean?", "Define the word {word}.", "Look up {word} in the dictionary.", "Give me the meaning of {word}."],
         lambda a, r: {"word": a["word"], "definition": "a kind of " + r.choice(WORDS)},
         ["{word}: {definition}.", "The word {word} means {definition}."], ["definition"]),
    Func("calculate_tip", "Calculate the tip for a bill",
         [Param("bill", "number", "Bill amount", _num(5, 200)), Param("percent", "integer", "Tip percent", _int(5, 25, 26, 40))],
         ["What is a {percent} percent tip on {bill}?", "Calculate the tip for a bill of {bill} at {percent} percent.",
          "How much should I tip on {bill} with {percent} percent?", "Tip of {percent} percent for {bill}, please."],
         lambda a, r: {"tip": round(a["bill"] * a["percent"] / 100, 2)},
         ["The tip is {tip}.", "A {percent} percent tip on {bill} is {tip}."], ["tip"]),
    Func("convert_temperature", "Convert a temperature to another unit",
         [Param("value", "number", "Temperature", _num(-20, 100)),
          Param("unit", "string", "Unit to convert to", ["celsius", "fahrenheit"], enum=["celsius", "fahrenheit"])],
         ["Convert {value} degrees to {unit}.", "What is {value} degrees in {unit}?", "Change {value} degrees into {unit}.",
          "Please turn {value} degrees into {unit}."],
         lambda a, r: {"result": round(a["value"] * 1.8 + 32 if a["unit"] == "fahrenheit" else (a["value"] - 32) / 1.8, 1)},
         ["That is {result} degrees {unit}.", "{value} degrees is {result} in {unit}."], ["result"]),
    Func("get_capital", "Get the capital city of a country",
         [Param("country", "string", "Country name", COUNTRIES)],
         ["What is the capital of {country}?", "Which city is the capital of {country}?", "Name the capital of {country}.",
          "Tell me the capital city of {country}."],
         lambda a, r: {"capital": r.choice(CITIES)},
         ["The capital of {country} is {capital}.", "It is {capital}."], ["capital"]),
    Func("create_reminder", "Create a reminder for a day of the week",
         [Param("task", "string", "What to remember", WORDS), Param("day", "string", "Day of the week", DAYS, enum=DAYS)],
         ["Remind me about the {task} on {day}.", "Create a reminder for {day}: {task}.", "On {day} remind me of the {task}.",
          "Set a reminder about the {task} for {day}."],
         lambda a, r: {"reminder": a["task"], "day": a["day"], "ok": True},
         ["I will remind you about the {reminder} on {day}.", "Reminder for {day} saved."], ["day"]),
    Func("get_news", "Get the latest news on a topic",
         [Param("topic", "string", "News topic", TOPICS)],
         ["What is the latest news about {topic}?", "Any news on {topic}?", "Show me {topic} news.", "Give me today's headlines about {topic}."],
         lambda a, r: {"headline": r.choice(WORDS).capitalize() + " wins " + r.choice(WORDS)},
         ["Top {topic} story: {headline}.", "The latest on {topic}: {headline}."], ["headline"]),
    Func("check_inventory", "Check how many units of an item are in stock",
         [Param("item", "string", "Item name", ITEMS)],
         ["How many {item}s are in stock?", "Check the inventory for {item}.", "Do we have any {item} left?", "Is the {item} in stock?"],
         lambda a, r: {"item": a["item"], "in_stock": r.randint(0, 80)},
         ["There are {in_stock} of {item} in stock.", "We have {in_stock} left."], ["in_stock"]),
    Func("order_pizza", "Order a pizza",
         [Param("size", "string", "Pizza size", ["small", "medium", "large"], enum=["small", "medium", "large"]),
          Param("topping", "string", "Topping", ["cheese", "ham", "mushroom", "pepper", "olive", "onion", "tuna", "salami"])],
         ["Order a {size} pizza with {topping}.", "I'd like a {size} {topping} pizza.", "Get me a {size} pizza, {topping} on top.",
          "Please order one {size} pizza with extra {topping}."],
         lambda a, r: {"order": r.randint(100, 999), "minutes": r.randint(15, 45)},
         ["Your {size} {topping} pizza arrives in {minutes} minutes.", "Order {order} placed, {minutes} minutes."], ["minutes"]),
    Func("turn_on_lights", "Turn on the lights in a room",
         [Param("room", "string", "Room name", ["kitchen", "bedroom", "hall", "garage", "office", "bathroom", "attic", "cellar"]),
          Param("brightness", "integer", "Brightness percent", _int(10, 100))],
         ["Turn on the {room} lights at {brightness} percent.", "Lights on in the {room}, {brightness} percent.",
          "Switch the {room} light on to {brightness} percent.", "Please light the {room} at {brightness} percent."],
         lambda a, r: {"room": a["room"], "on": True, "brightness": a["brightness"]},
         ["The {room} lights are on at {brightness} percent.", "Done, {room} lights on."], ["room"]),
    Func("set_thermostat", "Set the thermostat temperature",
         [Param("temperature", "integer", "Target temperature", _int(15, 28, 29, 32))],
         ["Set the thermostat to {temperature} degrees.", "Make it {temperature} degrees in here.", "Heat the house to {temperature} degrees.",
          "Change the thermostat to {temperature}."],
         lambda a, r: {"target": a["temperature"], "ok": True},
         ["The thermostat is set to {target} degrees.", "Done, {target} degrees."], ["target"]),
    Func("lookup_contact", "Find a contact's phone number",
         [Param("name", "string", "Contact name", NAMES)],
         ["What is {name}'s phone number?", "Find the number for {name}.", "Look up {name} in my contacts.", "How can I call {name}?"],
         lambda a, r: {"name": a["name"], "phone": "555-" + str(r.randint(1000, 9999))},
         ["{name}'s number is {phone}.", "You can call {name} at {phone}."], ["phone"]),
    Func("get_distance", "Get the distance between two cities",
         [Param("origin", "string", "First city", CITIES), Param("destination", "string", "Second city", CITIES)],
         ["How far is {origin} from {destination}?", "What is the distance from {origin} to {destination}?",
          "Distance between {origin} and {destination}?", "How many kilometres from {origin} to {destination}?"],
         lambda a, r: {"km": r.randint(50, 9000)},
         ["{origin} to {destination} is {km} km.", "It is about {km} kilometres."], ["km"]),
    Func("count_words", "Count the words in a text",
         [Param("text", "string", "The text", PHRASES)],
         ["How many words are in \"{text}\"?", "Count the words in \"{text}\".", "Word count of \"{text}\", please.",
          "Tell me the number of words in \"{text}\"."],
         lambda a, r: {"words": len(a["text"].split())},
         ["It has {words} words.", "\"{text}\" has {words} words."], ["words"]),
    Func("reverse_text", "Reverse a text",
         [Param("text", "string", "The text", WORDS + PHRASES)],
         ["Reverse the text \"{text}\".", "Write \"{text}\" backwards.", "What is \"{text}\" reversed?", "Please reverse \"{text}\"."],
         lambda a, r: {"reversed": a["text"][::-1]},
         ["Reversed: {reversed}", "It reads {reversed}."], ["reversed"]),
    Func("track_package", "Track a package by its tracking number",
         [Param("tracking_id", "string", "Tracking number", _tracking)],
         ["Where is my package {tracking_id}?", "Track parcel {tracking_id}.", "What is the status of package {tracking_id}?",
          "Can you check shipment {tracking_id}?"],
         lambda a, r: {"status": r.choice(["in transit", "delivered", "at the depot", "out for delivery"])},
         ["Package {tracking_id} is {status}.", "Your parcel is {status}."], ["status"]),
    Func("square_root", "Compute the square root of a number",
         [Param("number", "number", "The number", _num(1, 400))],
         ["What is the square root of {number}?", "Compute the square root of {number}.", "Square root of {number}?",
          "Find the root of {number}."],
         lambda a, r: {"root": round(a["number"] ** 0.5, 3)},
         ["The square root of {number} is {root}.", "It is {root}."], ["root"]),
    Func("get_recipe", "Find a recipe for a dish",
         [Param("dish", "string", "Dish name", DISHES),
          Param("vegetarian", "boolean", "Only vegetarian recipes", [True, False], say={True: "vegetarian", False: "classic"})],
         ["Find me a {vegetarian} recipe for {dish}.", "How do I cook a {vegetarian} {dish}?", "I need a {vegetarian} {dish} recipe.",
          "Give me a recipe for {vegetarian} {dish}."],
         lambda a, r: {"recipe": a["dish"] + " with " + r.choice(WORDS), "minutes": r.randint(10, 90)},
         ["Try {recipe}, ready in {minutes} minutes.", "Here is one: {recipe} ({minutes} min)."], ["recipe"]),
    Func("schedule_meeting", "Schedule a meeting with someone",
         [Param("person", "string", "Who to meet", NAMES), Param("day", "string", "Day of the week", DAYS, enum=DAYS)],
         ["Schedule a meeting with {person} on {day}.", "Book a meeting with {person} for {day}.", "Set up a call with {person} on {day}.",
          "I want to meet {person} on {day}."],
         lambda a, r: {"time": _time(r, False), "day": a["day"]},
         ["Meeting with {person} on {day} at {time}.", "Booked for {day} at {time}."], ["time"]),
    Func("search_web", "Search the web",
         [Param("query", "string", "Search words", WORDS + TOPICS)],
         ["Search the web for {query}.", "Look up {query} online.", "Google {query} for me.", "Find information about {query}."],
         lambda a, r: {"top_result": a["query"] + " - " + r.choice(WORDS) + ".org"},
         ["Top result: {top_result}.", "I found {top_result}."], ["top_result"]),
    # held-out functions (evaluation only)
    Func("get_air_quality", "Get the air quality index for a city",
         [Param("city", "string", "City name", CITIES)],
         ["What is the air quality in {city}?", "How clean is the air in {city}?", "Check the air quality index for {city}."],
         lambda a, r: {"city": a["city"], "aqi": r.randint(5, 200)},
         ["The air quality index in {city} is {aqi}."], ["aqi"]),
    Func("get_sunrise", "Get the sunrise time for a city",
         [Param("city", "string", "City name", CITIES)],
         ["When is sunrise in {city}?", "What time does the sun rise in {city}?", "Tell me the sunrise time for {city}."],
         lambda a, r: {"sunrise": f"{r.randint(4, 8)}:{r.randint(10, 59)}"},
         ["Sunrise in {city} is at {sunrise}."], ["sunrise"]),
    Func("get_movie_rating", "Get the rating of a film",
         [Param("title", "string", "Film title", TITLES)],
         ["What is the rating of {title}?", "How good is the film {title}?", "Look up the rating for {title}."],
         lambda a, r: {"title": a["title"], "rating": round(r.uniform(4, 9.5), 1)},
         ["{title} is rated {rating}."], ["rating"]),
    Func("roll_dice", "Roll a die with a number of sides",
         [Param("sides", "integer", "Number of sides", _int(4, 20, 21, 100))],
         ["Roll a die with {sides} sides.", "Roll a {sides} sided die.", "Throw a {sides}-sided die for me."],
         lambda a, r: {"roll": r.randint(1, a["sides"])},
         ["You rolled {roll}."], ["roll"]),
    Func("lock_door", "Lock a door of the house",
         [Param("door", "string", "Which door", ["front", "back", "garage", "side"], enum=["front", "back", "garage", "side"])],
         ["Lock the {door} door.", "Please lock the {door} door.", "Make sure the {door} door is locked."],
         lambda a, r: {"door": a["door"], "locked": True},
         ["The {door} door is locked."], ["door"]),
    Func("get_train_times", "Get the next trains from a station",
         [Param("station", "string", "Station or city name", CITIES)],
         ["When is the next train from {station}?", "Show train times for {station}.", "Next departures from {station} station?"],
         lambda a, r: {"next_train": _time(r, False), "platform": r.randint(1, 12)},
         ["The next train from {station} leaves at {next_train} from platform {platform}."], ["next_train"]),
]
HELDOUT_FUNCTIONS = ["get_air_quality", "get_sunrise", "get_movie_rating", "roll_dice", "lock_door", "get_train_times"]
BY_NAME = {f.name: f for f in FUNCS}
TRAIN_FUNCS = [f for f in FUNCS if f.name not in HELDOUT_FUNCTIONS]

# Requests with tools on offer that need none: answered in plain text.
PLAIN = [("Hello!", "Hello! How can I help you?"), ("Hi there.", "Hi! What can I do for you?"),
         ("Thank you.", "You are welcome."), ("Thanks, that is all.", "Glad to help. Goodbye!"),
         ("Who are you?", "I am an assistant. I can use the tools I am given."),
         ("Say hello in English.", "Hello."), ("Good morning.", "Good morning to you!"),
         ("Can you help me?", "Yes, of course. What do you need?"), ("Tell me a short poem.", "The rain is soft, the night is long."),
         ("What can you do?", "I can answer questions and call the tools you give me."), ("Goodbye.", "Goodbye!"),
         ("How are you?", "I am well, thank you."), ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet."),
         ("Say something nice.", "You are doing great."), ("Ok.", "Let me know if you need anything.")]
SYSTEM_PROMPTS = ["", "", "", "You are a helpful assistant.", "You are a helpful assistant with tools.",
                  "Answer briefly."]


def declaration(f: Func) -> dict:
    props = {}
    for p in f.params:
        props[p.name] = {"type": p.type, "description": p.desc}
        if p.enum:
            props[p.name]["enum"] = p.enum
    return {"type": "function", "function": {"name": f.name, "description": f.desc,
                                             "parameters": {"type": "object", "properties": props,
                                                            "required": [p.name for p in f.params]}}}


def _value(p: Param, rng: random.Random, held: bool):
    if callable(p.pool):
        return p.pool(rng, held)
    if p.type == "boolean" or p.enum:
        return rng.choice(p.pool)  # closed sets: no held-out split
    return rng.choice(_split(p.pool, held))


def _fmt(template: str, values: dict) -> str:
    return template.format(**{k: (v if not isinstance(v, bool) else str(v).lower()) for k, v in values.items()})


def request(f: Func, rng: random.Random, held: bool, template: str | None = None) -> tuple[str, dict]:
    """(user text, arguments) for a call of f."""
    args = {}
    for p in f.params:
        args[p.name] = _value(p, rng, held)
    # two cities in one request must differ
    if "origin" in args and args.get("destination") == args["origin"]:
        args["destination"] = next(c for c in _split(CITIES, held) if c != args["origin"])
    if "from_currency" in args and args["to_currency"] == args["from_currency"]:
        args["to_currency"] = next(c for c in CURRENCIES if c != args["from_currency"])
    said = {p.name: (p.say[args[p.name]] if p.say else args[p.name]) for p in f.params}
    if template is None:
        pool = f.asks if f.name in HELDOUT_FUNCTIONS else f.asks[:-1]
        template = rng.choice(pool)
    text = template.format(**said)
    if rng.random() < 0.15:
        text = text[0].lower() + text[1:]
    return text, args


def reasoning(f: Func, args: dict, rng: random.Random) -> str:
    vals = ", ".join(f"{k} {v}" for k, v in args.items())
    return rng.choice([f"The user wants to {f.desc[0].lower() + f.desc[1:]}. I will call {f.name} with {vals}.",
                       f"I should use {f.name} with {vals}.",
                       f"This needs the {f.name} tool: {vals}."])


def call_turn(f: Func, args: dict, think: bool, rng: random.Random) -> dict:
    turn = {"role": "assistant", "content": "",
            "tool_calls": [{"type": "function", "function": {"name": f.name, "arguments": args}}]}
    if think:
        turn["reasoning_content"] = reasoning(f, args, rng)
    return turn


def answer_turn(f: Func, args: dict, result: dict, think: bool, rng: random.Random) -> dict:
    text = _fmt(rng.choice(f.answers), {**args, **result})
    turn = {"role": "assistant", "content": text}
    if think:
        turn["reasoning_content"] = rng.choice(["The tool answered. I will tell the user.", "I have the result now.",
                                                f"{f.name} returned the result."])
    return turn


def tool_list(f: Func, rng: random.Random, pool: list[Func]) -> list[dict]:
    others = [g for g in pool if g.name != f.name]
    tools = [f] + rng.sample(others, rng.choice([0, 0, 1, 1, 2]))
    rng.shuffle(tools)
    return [declaration(t) for t in tools]


def _copies_string(f: Func) -> bool:
    """f has a free-form string argument drawn from a value pool (a value the call must copy)."""
    return any(p.type == "string" and isinstance(p.pool, list) and not p.enum for p in f.params)


COPY_FUNCS = [f for f in TRAIN_FUNCS if _copies_string(f)]


def conversation(rng: random.Random, held: bool = False, focus: str | None = None, focus_frac: float = 0.0,
                 short_frac: float = 0.0, drill_think: float = 0.25) -> dict:
    """One training (held=False) or evaluation (held=True) example:
    {'tools', 'messages', 'think', 'kind', 'function', 'arguments', 'result', 'check'}.
    A share short_frac of training examples are short copy drills: one call (with reasoning in a share
    drill_think of them), no system prompt, only the right tool offered (rarely one more), a function
    with a string argument to copy from the request (COPY_FUNCS, or `focus`)."""
    if not held and short_frac and rng.random() < short_frac:
        think = rng.random() < drill_think
        f = BY_NAME[focus] if focus and rng.random() < focus_frac else rng.choice(COPY_FUNCS)
        tools = [declaration(f)] + ([declaration(rng.choice([g for g in TRAIN_FUNCS if g is not f]))]
                                    if rng.random() < 0.15 else [])
        rng.shuffle(tools)
        msgs, kind = [], "call"
        return _call(f, tools, msgs, kind, think, rng, held)
    think = rng.random() < 0.4
    funcs = [BY_NAME[n] for n in HELDOUT_FUNCTIONS] + TRAIN_FUNCS if held else TRAIN_FUNCS
    msgs = []
    if sp := rng.choice(SYSTEM_PROMPTS):
        msgs.append({"role": "system", "content": sp})
    kind = rng.choices(["call", "plain", "multi"], [0.8, 0.1, 0.1])[0] if not held else "call"
    f = BY_NAME[focus] if focus and rng.random() < focus_frac else rng.choice(funcs)
    tools = tool_list(f, rng, TRAIN_FUNCS)
    if kind == "plain":
        q, a = rng.choice(PLAIN)
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return {"tools": tools, "messages": msgs, "think": False, "kind": kind}
    if kind == "multi":  # a first exchange, then the request that the example is about
        g = rng.choice(TRAIN_FUNCS)
        q, a = request(g, rng, held)
        res = g.result(a, rng)
        msgs += [{"role": "user", "content": q}, call_turn(g, a, think, rng),
                 {"role": "tool", "content": json.dumps(res, ensure_ascii=False)}, answer_turn(g, a, res, think, rng)]
        tools = [declaration(g)] + [t for t in tools if t["function"]["name"] != g.name]
    return _call(f, tools, msgs, kind, think, rng, held)


def _call(f: Func, tools: list, msgs: list, kind: str, think: bool, rng: random.Random, held: bool) -> dict:
    """Append a request for f, its call, the tool's result and the final answer."""
    template = None
    if held and f.name not in HELDOUT_FUNCTIONS:
        template = f.asks[-1]
    q, args = request(f, rng, held, template)
    res = f.result(args, rng)
    msgs += [{"role": "user", "content": q}, call_turn(f, args, think, rng),
             {"role": "tool", "content": json.dumps(res, ensure_ascii=False)}, answer_turn(f, args, res, think, rng)]
    return {"tools": tools, "messages": msgs, "think": think, "kind": kind, "function": f.name, "arguments": args,
            "result": res, "check": [str(res[k]) if k in res else k for k in f.check]}


def dataset(n: int, seed: int = 0, held: bool = False, focus: str | None = None, focus_frac: float = 0.0,
            short_frac: float = 0.0, drill_think: float = 0.25) -> list[dict]:
    """n conversations; a share focus_frac of them is about the function `focus` (the README demo),
    a share short_frac are short copy drills (see conversation)."""
    rng = random.Random(seed)
    return [conversation(rng, held, focus, focus_frac, short_frac, drill_think) for _ in range(n)]


def eval_set(n_per_function: int = 3, seed: int = 1234) -> list[dict]:
    """Held-out examples: every function, held-out template (or a held-out function) and values,
    thinking off and on alternately."""
    rng = random.Random(seed)
    out = []
    for f in FUNCS:
        for i in range(n_per_function):
            for _ in range(100):
                ex = conversation(rng, held=True)
                if ex["function"] == f.name:
                    break
            else:
                continue
            ex = _with_thinking(ex, think=(i % 2 == 1), rng=rng)
            out.append(ex)
    return out


def _with_thinking(ex: dict, think: bool, rng: random.Random) -> dict:
    for m in ex["messages"]:
        if m["role"] == "assistant":
            m.pop("reasoning_content", None)
    ex["think"] = think
    return ex


if __name__ == "__main__":
    import sys

    for ex in dataset(int(sys.argv[1]) if len(sys.argv) > 1 else 3, seed=0):
        print(json.dumps(ex, ensure_ascii=False)[:600])
