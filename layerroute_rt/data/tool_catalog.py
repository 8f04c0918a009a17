"""The synthetic generator's tool catalog (layerroute_rt.data.synthetic): 10 domains and 40 tools,
each a JSON-schema function whose parameters know how to draw a value (strings, free text,
integers, numbers, booleans, enums, arrays and nested objects), with the value pools they draw
from. A table: the generator's logic is in synthetic.py."""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


# --------------------------------------------------------------------------- parameter model
@dataclass(frozen=True)
class Param:
    """A tool argument (or result field): its JSON schema and how to sample and lengthen values.

    kind: string (drawn by `gen`), text (free text made of `pool` fragments, grows by one
    fragment at a time), enum, integer, number, boolean, array (of `item`), object (of `props`)."""
    name: str
    kind: str
    description: str = ""
    required: bool = True
    gen: Callable[[random.Random], Any] | None = None
    pool: tuple[str, ...] = ()
    low: float = 0
    high: float = 0
    sep: str = ", "
    item: Param | None = None
    props: tuple[Param, ...] = ()

    def schema(self) -> dict[str, Any]:
        """The JSON schema of this parameter."""
        kind_type = {"text": "string", "enum": "string"}.get(self.kind, self.kind)
        out: dict[str, Any] = {"type": kind_type}
        if self.description:
            out["description"] = self.description
        if self.kind == "enum":
            out["enum"] = list(self.pool)
        elif self.kind == "array":
            out["items"] = self.item.schema()
        elif self.kind == "object":
            out["properties"] = {p.name: p.schema() for p in self.props}
            out["required"] = [p.name for p in self.props if p.required]
        return out

    def sample(self, rng: random.Random) -> Any:
        """A small value: required fields only, the fewest array items, one text fragment."""
        if self.kind == "string":
            return self.gen(rng)
        if self.kind in ("text", "enum"):
            return rng.choice(self.pool)
        if self.kind == "integer":
            return rng.randint(int(self.low), int(self.high))
        if self.kind == "number":
            return round(rng.uniform(self.low, self.high), 2)
        if self.kind == "boolean":
            return rng.random() < 0.5
        if self.kind == "array":
            items: list[Any] = []
            while len(items) < self.low:
                items = self.grow(items, rng) or items
            return items
        return {p.name: p.sample(rng) for p in self.props if p.required}

    def grow(self, value: Any, rng: random.Random) -> Any | None:
        """A slightly longer copy of value (one more text fragment, array item or optional field,
        or a grown field), or None when it cannot grow."""
        if self.kind == "text":
            unused = [f for f in self.pool if f not in value]
            return value + self.sep + rng.choice(unused) if unused else None
        if self.kind == "array":
            if len(value) >= self.high:
                return None
            for _ in range(8):
                new = self.item.sample(rng)
                if new not in value:
                    return value + [new]
            return None
        if self.kind != "object":
            return None
        options = [p for p in self.props if p.name not in value or p.kind in ("text", "array", "object")]
        rng.shuffle(options)
        for p in options:
            new = p.sample(rng) if p.name not in value else p.grow(value[p.name], rng)
            if new is not None:
                return {**value, p.name: new}
        return None


def _s(name: str, desc: str, gen: Callable[[random.Random], Any] | tuple, required: bool = True) -> Param:
    """A string drawn from a pool (tuple) or a generator."""
    draw = gen if callable(gen) else (lambda rng, pool=gen: rng.choice(pool))
    return Param(name, "string", desc, required, gen=draw)


def _text(name: str, desc: str, pool: tuple[str, ...], required: bool = True, sep: str = ", ") -> Param:
    return Param(name, "text", desc, required, pool=pool, sep=sep)


def _enum(name: str, desc: str, values: tuple[str, ...], required: bool = True) -> Param:
    return Param(name, "enum", desc, required, pool=values)


def _int(name: str, desc: str, low: int, high: int, required: bool = True) -> Param:
    return Param(name, "integer", desc, required, low=low, high=high)


def _num(name: str, desc: str, low: float, high: float, required: bool = True) -> Param:
    return Param(name, "number", desc, required, low=low, high=high)


def _bool(name: str, desc: str, required: bool = False) -> Param:
    return Param(name, "boolean", desc, required)


def _arr(name: str, desc: str, item: Param, low: int, high: int, required: bool = True) -> Param:
    return Param(name, "array", desc, required, low=low, high=high, item=item)


def _obj(name: str, desc: str, *props: Param, required: bool = True) -> Param:
    return Param(name, "object", desc, required, props=props)


# --------------------------------------------------------------------------- value pools
CITIES = ("Paris", "Tokyo", "New York", "London", "Berlin", "Sydney", "Toronto", "Madrid", "Rome",
          "Lisbon", "Seoul", "Singapore", "Nairobi", "Mexico City", "Oslo", "Dubai", "Chicago",
          "San Francisco", "Cairo", "Buenos Aires")
AIRPORTS = ("CDG", "HND", "JFK", "LHR", "BER", "SYD", "YYZ", "MAD", "FCO", "LIS", "ICN", "SIN",
            "NBO", "MEX", "OSL", "DXB", "ORD", "SFO", "CAI", "EZE")
TICKERS = ("AAPL", "MSFT", "GOOGL", "AMZN", "NVDA", "TSLA", "META", "NFLX", "AMD", "IBM", "ORCL", "SAP")
CURRENCIES = ("USD", "EUR", "GBP", "JPY", "CHF", "CAD", "AUD", "SGD", "NOK", "MXN")
PEOPLE = ("Alice Martin", "Bob Chen", "Carla Diaz", "David Okafor", "Emma Larsen", "Farid Haddad",
          "Grace Kim", "Hugo Moreau", "Ines Silva", "Jonas Weber", "Keiko Sato", "Liam Byrne")
PRODUCTS = ("wireless headphones", "standing desk", "espresso machine", "running shoes",
            "mechanical keyboard", "air purifier", "hiking backpack", "4K monitor", "robot vacuum",
            "yoga mat", "electric kettle", "smart watch", "office chair", "water bottle")
REPOS = ("acme/webapp", "acme/payments", "data-team/etl", "infra/deploy-tools", "ml/feature-store",
         "mobile/ios-client")
LANGUAGES = ("French", "Spanish", "German", "Japanese", "Korean", "Portuguese", "Italian", "Arabic")
PLACES = ("coffee shop", "pharmacy", "museum", "gym", "bookstore", "train station", "park",
          "vegan restaurant", "coworking space", "bakery")
STREETS = ("Main Street", "Oak Avenue", "Harbor Road", "Station Square", "Maple Lane", "King Street")
SPECIALTIES = ("cardiology", "dermatology", "pediatrics", "orthopedics", "general practice", "neurology")
MEDICATIONS = ("ibuprofen", "amoxicillin", "metformin", "lisinopril", "vitamin D", "cetirizine")
TOPICS = ("renewable energy", "interest rates", "electric vehicles", "space exploration",
          "climate policy", "semiconductors", "public transport", "AI regulation", "housing market")


def _date(rng: random.Random) -> str:
    return f"2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


def _time(rng: random.Random) -> str:
    return f"{rng.randint(7, 20):02d}:{rng.choice(('00', '15', '30', '45'))}"


def _email(rng: random.Random) -> str:
    return rng.choice(PEOPLE).lower().replace(" ", ".") + "@example.com"


def _ident(prefix: str) -> Callable[[random.Random], str]:
    return lambda rng: f"{prefix}-{rng.randint(10000, 99999)}"


def _place_name(rng: random.Random) -> str:
    return f"{rng.choice(STREETS).split()[0]} {rng.choice(PLACES)}"


def _address(rng: random.Random) -> str:
    return f"{rng.randint(1, 250)} {rng.choice(STREETS)}, {rng.choice(CITIES)}"


# Free-text fragments, one pool per kind of text argument.
TRAVEL_PREFS = ("window seat", "no overnight layovers", "morning departure", "under 900 dollars",
                "one checked bag", "traveling with a toddler", "flexible by one day",
                "prefer direct flights", "extra legroom", "vegetarian meal", "arrive before noon")
HOTEL_PREFS = ("quiet room", "free breakfast", "close to the old town", "late check-in",
               "non-smoking", "gym access", "pet friendly", "two single beds", "city view")
SEARCH_TERMS = ("best rated", "near the city center", "open late", "with good reviews",
                "budget friendly", "family friendly", "recent results only", "in English",
                "from the last week", "with photos", "official sources")
EMAIL_SENTENCES = ("Thanks for the quick reply.", "I have attached the updated numbers.",
                   "Could you confirm the meeting time?", "The deadline moved to Friday.",
                   "Let me know if anything is missing.", "I will be out of office on Monday.",
                   "Please review the draft before the call.", "We can discuss the budget next week.",
                   "The client approved the proposal.", "See you at the workshop.")
CODE_LINES = ("import math", "data = [3, 1, 4, 1, 5, 9, 2, 6]", "total = sum(data)",
              "mean = total / len(data)", "print(round(mean, 3))", "squares = [x * x for x in data]",
              "print(max(squares))", "print(sorted(set(data)))", "print(math.sqrt(total))")
ISSUE_SENTENCES = ("The login page returns a 500 error.", "It started after the last deploy.",
                   "Steps to reproduce are in the attached log.", "Only Safari users are affected.",
                   "The retry logic does not back off.", "Memory grows by about 2 GB per hour.",
                   "A rollback fixes the problem.", "The failing test is test_checkout_total.")
SYMPTOMS = ("mild headache", "sore throat", "low fever", "dry cough", "fatigue", "runny nose",
            "joint pain", "dizziness when standing", "trouble sleeping", "shortness of breath")
REVIEW_SENTENCES = ("Arrived two days early.", "The build quality is excellent.",
                    "Battery life is shorter than advertised.", "Setup took five minutes.",
                    "Great value for the price.", "The instructions were confusing.",
                    "Customer support answered quickly.", "I would buy it again.")
EVENT_NOTES = ("bring the quarterly report", "dial-in link in the invite", "agenda: budget review",
               "invite the design team", "room 4B", "lunch provided", "prepare demo slides",
               "record the session")
MESSAGE_SENTENCES = ("The deploy finished without errors.", "Can someone review my pull request?",
                     "Standup moves to 10:30 today.", "The dashboard is back online.",
                     "Reminder: submit expenses by Friday.", "Great job on the launch, everyone!",
                     "I am looking into the flaky test.")
WORKOUT_NOTES = ("felt strong", "knee a bit sore", "new personal best", "hot and humid",
                 "interval pace", "easy recovery day", "hill repeats", "stretching afterwards")
REMINDER_NOTES = ("call the dentist", "renew the passport", "pay the electricity bill",
                  "water the plants", "book the car service", "buy a birthday gift")
TRANSLATE_SENTENCES = ("Where is the train station?", "I would like to book a table for two.",
                       "The meeting has been moved to Thursday.", "Thank you for your help.",
                       "How much does this cost?", "Please send me the invoice.")


# --------------------------------------------------------------------------- the tool catalog
@dataclass(frozen=True)
class Tool:
    """A function a trajectory can call: its argument and result models and a user-task template
    that names required scalar arguments ({origin}, ...)."""
    name: str
    domain: str
    description: str
    params: Param
    returns: Param
    task: str

    def schema(self) -> dict[str, Any]:
        """The OpenAI/Qwen function spec."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.params.schema()}}


def _tool(domain: str, name: str, description: str, task: str, params: tuple[Param, ...],
          returns: tuple[Param, ...]) -> Tool:
    return Tool(name, domain, description, _row(*params), _row(*returns), task)


def _item(values: tuple[str, ...] | Callable[[random.Random], Any], enum: bool = False) -> Param:
    """An array item: a string drawn from values (an enum if enum)."""
    return _enum("", "", values) if enum else _s("", "", values)


def _row(*props: Param) -> Param:
    """An object in a tool result."""
    return _obj("", "", *props)


_PRICE = _num("price", "", 20, 2500)
_STATUS = _enum("status", "", ("confirmed", "pending", "completed"))
_GATE = _s("gate", "", lambda r: f"{r.choice('ABCDE')}{r.randint(1, 40)}")
_NEWS_URL = _ident("https://news.example.com/story")
_SLACK_TS = _s("ts", "", lambda r: f"{r.randint(1700000000, 1790000000)}.{r.randint(100, 999)}")

TOOLS: tuple[Tool, ...] = (
    # travel
    _tool("travel", "search_flights", "Search for flights between two airports on a date",
          "Find flights from {origin} to {destination} on {departure_date}.",
          (_s("origin", "IATA code of the departure airport", AIRPORTS),
           _s("destination", "IATA code of the arrival airport", AIRPORTS),
           _s("departure_date", "Departure date, YYYY-MM-DD", _date),
           _int("passengers", "Number of passengers", 1, 6, required=False),
           _enum("cabin", "Cabin class", ("economy", "premium_economy", "business", "first"), required=False),
           _text("preferences", "Free-text preferences", TRAVEL_PREFS, required=False)),
          (_arr("flights", "", _row(_s("flight_number", "", _ident("FL")), _s("departure", "", _time),
                                    _PRICE), 1, 4),
           _s("currency", "", CURRENCIES))),
    _tool("travel", "book_hotel", "Book a hotel room in a city for a stay",
          "Book a hotel in {city} from {check_in} to {check_out}.",
          (_s("city", "City of the hotel", CITIES),
           _s("check_in", "Check-in date, YYYY-MM-DD", _date),
           _s("check_out", "Check-out date, YYYY-MM-DD", _date),
           _obj("guests", "Who is staying", _int("adults", "Number of adults", 1, 4),
                _int("children", "Number of children", 0, 3, required=False), required=False),
           _num("max_price_per_night", "Budget per night", 50, 600, required=False),
           _text("requests", "Special requests", HOTEL_PREFS, required=False)),
          (_s("booking_id", "", _ident("HB")), _s("hotel", "", lambda r: f"Hotel {r.choice(STREETS)}"),
           _num("total_price", "", 120, 4000), _STATUS)),
    _tool("travel", "get_flight_status", "Get the live status of a flight",
          "What is the status of flight {flight_number}?",
          (_s("flight_number", "Flight number", _ident("FL")),
           _s("date", "Flight date, YYYY-MM-DD", _date, required=False)),
          (_enum("status", "", ("on_time", "delayed", "boarding", "cancelled")), _GATE,
           _int("delay_minutes", "", 0, 180, required=False))),
    _tool("travel", "search_car_rentals", "Search rental cars at a pick-up location",
          "Find a rental car in {location} from {pickup_date} to {return_date}.",
          (_s("location", "Pick-up city", CITIES),
           _s("pickup_date", "Pick-up date, YYYY-MM-DD", _date),
           _s("return_date", "Return date, YYYY-MM-DD", _date),
           _enum("car_type", "Car category", ("compact", "sedan", "suv", "van", "electric"), required=False),
           _bool("automatic", "Automatic transmission only"),
           _arr("extras", "Extras to include", _item(("gps", "child_seat", "snow_chains", "extra_driver"),
                                                     enum=True), 0, 3, required=False)),
          (_arr("offers", "", _row(_s("company", "", ("Hertz", "Avis", "Sixt", "Europcar")), _PRICE),
                1, 3),)),
    # finance
    _tool("finance", "get_stock_quote", "Get the latest quote for a stock ticker",
          "What is {symbol} trading at right now?",
          (_s("symbol", "Ticker symbol", TICKERS),
           _arr("fields", "Quote fields to return",
                _item(("price", "volume", "change", "market_cap", "pe_ratio"), enum=True), 0, 4,
                required=False)),
          (_num("price", "", 10, 900), _num("change_percent", "", -8, 8), _s("currency", "", ("USD",)))),
    _tool("finance", "convert_currency", "Convert an amount between two currencies",
          "Convert {amount} {from_currency} to {to_currency}.",
          (_num("amount", "Amount to convert", 1, 10000),
           _s("from_currency", "ISO code to convert from", CURRENCIES),
           _s("to_currency", "ISO code to convert to", CURRENCIES)),
          (_num("converted_amount", "", 1, 20000), _num("rate", "", 0.01, 160))),
    _tool("finance", "get_account_transactions", "List recent transactions of a bank account",
          "Show the transactions of account {account_id} since {start_date}.",
          (_s("account_id", "Account identifier", _ident("ACC")),
           _s("start_date", "First date, YYYY-MM-DD", _date),
           _arr("categories", "Only these categories",
                _item(("groceries", "travel", "rent", "dining", "utilities", "salary"), enum=True), 0, 4,
                required=False),
           _num("min_amount", "Smallest amount to list", 0, 500, required=False)),
          (_arr("transactions", "", _row(_s("date", "", _date), _s("merchant", "", PRODUCTS),
                                         _num("amount", "", -900, 900)), 1, 4),)),
    _tool("finance", "transfer_funds", "Transfer money between accounts",
          "Transfer {amount} {currency} to {recipient}.",
          (_s("recipient", "Name of the recipient", PEOPLE),
           _num("amount", "Amount", 5, 5000),
           _s("currency", "Currency code", CURRENCIES),
           _obj("schedule", "When to send", _s("date", "Execution date, YYYY-MM-DD", _date),
                _enum("repeat", "Recurrence", ("none", "weekly", "monthly"), required=False), required=False),
           _text("reference", "Payment reference", ("rent share", "dinner last week", "concert tickets",
                                                    "invoice 2231", "birthday gift"), required=False)),
          (_s("transfer_id", "", _ident("TX")), _STATUS)),
    # weather
    _tool("weather", "get_current_weather", "Get the current weather for a location",
          "What's the weather like in {location}?",
          (_s("location", "City name", CITIES),
           _enum("units", "Temperature units", ("celsius", "fahrenheit"), required=False)),
          (_num("temperature", "", -15, 40),
           _enum("condition", "", ("sunny", "cloudy", "rain", "snow", "windy")),
           _int("humidity", "", 10, 100))),
    _tool("weather", "get_forecast", "Get a multi-day weather forecast",
          "Give me the {days}-day forecast for {location}.",
          (_s("location", "City name", CITIES),
           _int("days", "Number of days", 1, 10),
           _arr("include", "Extra data to include",
                _item(("hourly", "precipitation", "wind", "uv_index", "sunrise"), enum=True), 0, 4,
                required=False)),
          (_arr("daily", "", _row(_s("date", "", _date), _num("high", "", -5, 40), _num("low", "", -15, 25)),
                1, 4),)),
    _tool("weather", "get_air_quality", "Get the air quality index for a city",
          "How is the air quality in {city} today?",
          (_s("city", "City name", CITIES),
           _arr("pollutants", "Pollutants to report",
                _item(("pm25", "pm10", "ozone", "no2", "so2"), enum=True), 0, 4, required=False)),
          (_int("aqi", "", 5, 300), _enum("category", "", ("good", "moderate", "unhealthy")))),
    _tool("weather", "get_weather_alerts", "List active weather alerts for a region",
          "Are there any weather alerts for {region}?",
          (_s("region", "City or region", CITIES),
           _enum("severity", "Minimum severity", ("minor", "moderate", "severe", "extreme"), required=False)),
          (_arr("alerts", "", _row(_enum("type", "", ("storm", "heat", "flood", "frost")),
                                   _s("until", "", _date)), 0, 3),)),
    # calendar
    _tool("calendar", "create_event", "Create a calendar event",
          "Schedule '{title}' on {date} at {start_time}.",
          (_s("title", "Event title", ("Team sync", "Budget review", "Design critique", "1:1 with manager",
                                       "Quarterly planning", "Dentist")),
           _s("date", "Date, YYYY-MM-DD", _date),
           _s("start_time", "Start time, HH:MM", _time),
           _int("duration_minutes", "Length in minutes", 15, 180, required=False),
           _arr("attendees", "Email addresses to invite", _item(_email), 0, 5, required=False),
           _obj("reminder", "Reminder settings", _int("minutes_before", "Minutes before start", 5, 120),
                _enum("method", "How to remind", ("popup", "email")), required=False),
           _text("notes", "Notes for the invite", EVENT_NOTES, required=False)),
          (_s("event_id", "", _ident("EV")), _STATUS)),
    _tool("calendar", "list_events", "List calendar events in a date range",
          "What is on my calendar between {start_date} and {end_date}?",
          (_s("start_date", "First day, YYYY-MM-DD", _date),
           _s("end_date", "Last day, YYYY-MM-DD", _date),
           _text("query", "Only events matching this text",
                 ("standup", "review", "client", "offsite", "interview"), required=False)),
          (_arr("events", "", _row(_s("title", "", ("Team sync", "Client call", "Lunch")),
                                   _s("start", "", _time)), 0, 4),)),
    _tool("calendar", "find_free_slots", "Find free time slots shared by several people",
          "Find a {duration_minutes}-minute slot on {date} when everyone is free.",
          (_arr("participants", "Email addresses", _item(_email), 1, 5),
           _s("date", "Date, YYYY-MM-DD", _date),
           _int("duration_minutes", "Slot length in minutes", 15, 120),
           _obj("working_hours", "Limit to these hours", _s("start", "HH:MM", _time),
                _s("end", "HH:MM", _time), required=False)),
          (_arr("slots", "", _item(_time), 0, 4),)),
    _tool("calendar", "cancel_event", "Cancel a calendar event",
          "Cancel the event {event_id}.",
          (_s("event_id", "Event identifier", _ident("EV")),
           _bool("notify_attendees", "Email the attendees"),
           _text("reason", "Reason sent to attendees", ("schedule conflict", "speaker unavailable",
                                                        "moved to next week", "holiday"), required=False)),
          (_STATUS,)),
    # e-commerce
    _tool("ecommerce", "search_products", "Search the product catalog",
          "Find me a {query} under {max_price} dollars.",
          (_s("query", "What to search for", PRODUCTS),
           _num("max_price", "Highest price", 20, 1500),
           _enum("sort_by", "Sort order", ("relevance", "price_asc", "price_desc", "rating"), required=False),
           _arr("brands", "Only these brands", _item(("Acme", "Nordic", "Zenith", "Orbit", "Kappa")), 0, 3,
                required=False),
           _bool("in_stock_only", "Hide items out of stock")),
          (_arr("products", "", _row(_s("sku", "", _ident("SKU")), _PRICE, _num("rating", "", 1, 5)),
                1, 4),)),
    _tool("ecommerce", "add_to_cart", "Add a product to the shopping cart",
          "Add {quantity} of item {sku} to my cart.",
          (_s("sku", "Product SKU", _ident("SKU")),
           _int("quantity", "How many", 1, 5),
           _obj("options", "Product options", _enum("color", "Color", ("black", "white", "blue", "red")),
                _enum("size", "Size", ("S", "M", "L", "XL"), required=False), required=False)),
          (_int("cart_items", "", 1, 12), _num("cart_total", "", 20, 3000))),
    _tool("ecommerce", "track_order", "Track the delivery of an order",
          "Where is my order {order_id}?",
          (_s("order_id", "Order number", _ident("ORD")),
           _bool("include_history", "Include the tracking history")),
          (_enum("status", "", ("processing", "shipped", "out_for_delivery", "delivered")),
           _s("eta", "", _date))),
    _tool("ecommerce", "submit_review", "Submit a product review",
          "Leave a {rating}-star review for {sku}.",
          (_s("sku", "Product SKU", _ident("SKU")),
           _int("rating", "Stars from 1 to 5", 1, 5),
           _text("text", "Review text", REVIEW_SENTENCES, sep=" "),
           _bool("anonymous", "Hide my name")),
          (_s("review_id", "", _ident("RV")), _STATUS)),
    # code
    _tool("code", "run_python", "Execute Python code in a sandbox and return its output",
          "Run a quick Python computation for me with a {timeout_seconds}-second limit.",
          (_text("code", "Python source to run", CODE_LINES, sep="\n"),
           _int("timeout_seconds", "Time limit", 1, 60)),
          (_s("stdout", "", ("3.875", "81", "[1, 2, 3, 4, 5, 6, 9]", "5.568")), _int("exit_code", "", 0, 0))),
    _tool("code", "search_code", "Search a repository for code matching a query",
          "Search {repo} for code about {query}.",
          (_s("repo", "owner/name", REPOS),
           _s("query", "Search terms", ("retry logic", "auth token", "checkout total", "cache eviction",
                                        "rate limit")),
           _enum("language", "Programming language", ("python", "typescript", "go", "rust", "java"),
                 required=False),
           _int("max_results", "Most results to return", 1, 50, required=False)),
          (_arr("matches", "", _row(_s("path", "", ("src/app.py", "lib/cache.go", "api/auth.ts")),
                                    _int("line", "", 1, 900)), 0, 4),)),
    _tool("code", "create_github_issue", "Open an issue in a GitHub repository",
          "Open an issue in {repo} titled '{title}'.",
          (_s("repo", "owner/name", REPOS),
           _s("title", "Issue title", ("Checkout fails on Safari", "Memory leak in worker",
                                       "Flaky test in CI", "Retry storm after deploy")),
           _text("body", "Issue description", ISSUE_SENTENCES, sep=" ", required=False),
           _arr("labels", "Labels", _item(("bug", "performance", "ci", "urgent", "frontend"), enum=True),
                0, 3, required=False)),
          (_int("issue_number", "", 1, 4000),
           _s("url", "", lambda r: f"https://github.com/{r.choice(REPOS)}/issues/{r.randint(1, 4000)}"))),
    _tool("code", "run_tests", "Run a repository's test suite",
          "Run the tests of {repo} on branch {branch}.",
          (_s("repo", "owner/name", REPOS),
           _s("branch", "Git branch", ("main", "develop", "fix/retry", "feature/cart")),
           _arr("paths", "Only these test paths",
                _item(("tests/unit", "tests/api", "tests/e2e", "tests/test_cart.py")), 0, 3, required=False),
           _bool("fail_fast", "Stop at the first failure")),
          (_int("passed", "", 10, 900), _int("failed", "", 0, 5), _num("duration_s", "", 2, 600))),
    # health
    _tool("health", "log_workout", "Log a workout session",
          "Log my {activity} workout of {duration_minutes} minutes.",
          (_enum("activity", "Type of workout", ("running", "cycling", "swimming", "yoga", "strength")),
           _int("duration_minutes", "Duration", 10, 180),
           _num("distance_km", "Distance covered", 0.5, 120, required=False),
           _obj("heart_rate", "Heart rate summary", _int("avg", "Average bpm", 90, 170),
                _int("max", "Max bpm", 120, 200, required=False), required=False),
           _text("notes", "How it felt", WORKOUT_NOTES, required=False)),
          (_s("entry_id", "", _ident("WK")), _int("calories", "", 50, 1500))),
    _tool("health", "search_symptoms", "Look up possible causes of symptoms",
          "I have {symptoms_text}; what could it be?",
          (_text("symptoms_text", "The symptoms in words", SYMPTOMS),
           _int("age", "Age in years", 5, 90),
           _enum("sex", "Sex", ("female", "male", "other"), required=False),
           _int("duration_days", "For how many days", 1, 30, required=False)),
          (_arr("conditions", "", _item(("common cold", "influenza", "migraine", "seasonal allergy",
                                         "dehydration")), 1, 3),
           _enum("urgency", "", ("self_care", "see_doctor", "urgent")))),
    _tool("health", "find_doctors", "Find doctors by specialty near a location",
          "Find a {specialty} doctor in {city}.",
          (_s("specialty", "Medical specialty", SPECIALTIES),
           _s("city", "City", CITIES),
           _arr("languages", "Languages the doctor speaks", _item(LANGUAGES), 0, 3, required=False),
           _bool("accepts_new_patients", "Only doctors taking new patients")),
          (_arr("doctors", "", _row(_s("name", "", lambda r: "Dr. " + r.choice(PEOPLE)),
                                    _num("rating", "", 3, 5)), 1, 3),)),
    _tool("health", "track_medication", "Set up a medication schedule",
          "Remind me to take {medication} {times_per_day} times a day.",
          (_s("medication", "Medication name", MEDICATIONS),
           _int("times_per_day", "Doses per day", 1, 4),
           _num("dose_mg", "Dose in mg", 5, 1000, required=False),
           _arr("times", "Times of day, HH:MM", _item(_time), 0, 4, required=False),
           _bool("with_food", "Take with food")),
          (_s("schedule_id", "", _ident("MED")), _STATUS)),
    # maps
    _tool("maps", "get_directions", "Get directions between two places",
          "How do I get from {origin} to {destination}?",
          (_s("origin", "Start address", _address),
           _s("destination", "End address", _address),
           _enum("mode", "Travel mode", ("driving", "walking", "transit", "cycling"), required=False),
           _arr("avoid", "Things to avoid", _item(("tolls", "highways", "ferries"), enum=True), 0, 3,
                required=False)),
          (_num("distance_km", "", 0.5, 400), _int("duration_minutes", "", 3, 400),
           _arr("steps", "", _item(("Head north", "Turn left", "Continue straight", "Take the second exit")),
                1, 4))),
    _tool("maps", "search_places", "Search for places of a kind near a location",
          "Find a {category} near {near}.",
          (_s("category", "Kind of place", PLACES),
           _s("near", "Address or city", _address),
           _int("radius_m", "Search radius in meters", 100, 5000, required=False),
           _bool("open_now", "Only places open now"),
           _text("keywords", "Extra keywords", SEARCH_TERMS, required=False)),
          (_arr("places", "", _row(_s("name", "", _place_name),
                                   _int("distance_m", "", 50, 5000)), 1, 4),)),
    _tool("maps", "geocode_address", "Convert an address to coordinates",
          "What are the coordinates of {address}?",
          (_s("address", "Street address", _address),),
          (_num("lat", "", -60, 70), _num("lon", "", -170, 170))),
    _tool("maps", "estimate_travel_time", "Estimate travel time for a trip at a departure time",
          "How long will it take to get from {origin} to {destination} at {departure_time}?",
          (_s("origin", "Start address", _address),
           _s("destination", "End address", _address),
           _s("departure_time", "HH:MM", _time),
           _enum("mode", "Travel mode", ("driving", "transit"), required=False)),
          (_int("duration_minutes", "", 5, 300), _enum("traffic", "", ("light", "moderate", "heavy")))),
    # communication
    _tool("communication", "send_email", "Send an email",
          "Email {to} about '{subject}'.",
          (_s("to", "Recipient address", _email),
           _s("subject", "Subject line", ("Project update", "Meeting notes", "Invoice", "Quick question",
                                          "Travel plans")),
           _text("body", "Email body", EMAIL_SENTENCES, sep=" "),
           _arr("cc", "Addresses in copy", _item(_email), 0, 3, required=False),
           _enum("priority", "Priority", ("low", "normal", "high"), required=False)),
          (_s("message_id", "", _ident("MSG")), _STATUS)),
    _tool("communication", "send_slack_message", "Post a message to a Slack channel",
          "Post a message in {channel}.",
          (_s("channel", "Channel name", ("#general", "#engineering", "#releases", "#random", "#support")),
           _text("text", "Message text", MESSAGE_SENTENCES, sep=" "),
           Param("thread_ts", "string", "Thread to reply in", False, gen=_SLACK_TS.gen)),
          (_bool("ok", "", required=True), _SLACK_TS)),
    _tool("communication", "search_emails", "Search the mailbox",
          "Find emails from {sender} since {since}.",
          (_s("sender", "Sender address", _email),
           _s("since", "Earliest date, YYYY-MM-DD", _date),
           _bool("unread_only", "Only unread messages"),
           _int("limit", "Most results", 1, 50, required=False)),
          (_arr("emails", "", _row(_s("subject", "", ("Re: Invoice", "Project update", "Lunch?")),
                                   _s("date", "", _date)), 0, 4),)),
    _tool("communication", "create_reminder", "Create a reminder",
          "Remind me on {date} at {time} to {task}.",
          (_s("task", "What to remember", REMINDER_NOTES),
           _s("date", "Date, YYYY-MM-DD", _date),
           _s("time", "HH:MM", _time),
           _enum("repeat", "Recurrence", ("none", "daily", "weekly"), required=False)),
          (_s("reminder_id", "", _ident("RM")), _STATUS)),
    # knowledge
    _tool("knowledge", "search_web", "Search the web",
          "Search the web for the latest on {query}.",
          (_s("query", "Search query", TOPICS),
           _int("num_results", "How many results", 1, 20, required=False),
           _text("filters", "Extra search filters", SEARCH_TERMS, required=False)),
          (_arr("results", "", _row(_s("title", "", lambda r: f"{r.choice(TOPICS).title()}: what changed"),
                                    _s("url", "", _NEWS_URL)), 1, 4),)),
    _tool("knowledge", "get_news", "Get top news headlines on a topic",
          "What are today's headlines about {topic}?",
          (_s("topic", "News topic", TOPICS),
           _s("country", "Country code", ("us", "gb", "de", "fr", "jp", "in"), required=False),
           _enum("language", "Language", ("en", "de", "fr", "es"), required=False)),
          (_arr("headlines", "", _item(lambda r: f"New report on {r.choice(TOPICS)} published"), 1, 4),)),
    _tool("knowledge", "translate_text", "Translate text into another language",
          "Translate this into {target_language}.",
          (_text("text", "Text to translate", TRANSLATE_SENTENCES, sep=" "),
           _s("target_language", "Target language", LANGUAGES),
           _s("source_language", "Source language", ("English",), required=False),
           _enum("formality", "Register", ("formal", "informal"), required=False)),
          (_s("translation", "", ("[translated text]",)), _num("confidence", "", 0.6, 1))),
    _tool("knowledge", "get_wikipedia_summary", "Get the summary of a Wikipedia article",
          "Give me a short summary of the Wikipedia article on {title}.",
          (_s("title", "Article title", TOPICS),
           _int("sentences", "How many sentences", 1, 10, required=False),
           _s("language", "Wiki language code", ("en", "de", "fr", "es"), required=False)),
          (_s("summary", "", lambda r: f"An overview of {r.choice(TOPICS)} and its recent history."),
           _s("url", "", lambda r: f"https://en.wikipedia.org/wiki/{r.randint(1000, 9999)}"))),
)
DOMAINS = tuple(dict.fromkeys(t.domain for t in TOOLS))
