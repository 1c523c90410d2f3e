<?php
// The function runtime: loads the handler, then loops over the Runtime API:
// fetch the next event, call the handler, post its result or its error.
//
// $_HANDLER names a file relative to $LAMBDA_TASK_ROOT that returns a
// callable taking ($event, $context). An object with a handle() method also
// works. $LAMBDA_TASK_ROOT/vendor/autoload.php is loaded first when present.
//
// A PHP fatal error ends the process: the shutdown function reports it for
// the current invocation and exits with EXIT_RESTART, and /opt/bootstrap
// starts a fresh process for the next event.

declare(strict_types=1);

namespace PhpLambdaLayers\Runtime;

require __DIR__ . '/runtime-api.php';

const FATAL_ERRORS = E_ERROR | E_PARSE | E_CORE_ERROR | E_COMPILE_ERROR | E_USER_ERROR | E_RECOVERABLE_ERROR;

/** The runtime's state, read by the shutdown function. */
final class FunctionRuntime
{
    /** The request id of the invocation running now, or null. */
    public ?string $current = null;
    public bool $initialized = false;
    /** Set once the runtime has reported why it exits. */
    private bool $reported = false;

    public function __construct(public readonly RuntimeApi $api)
    {
    }

    /** Loads the handler, or reports an init error and exits. */
    public function loadHandler(): callable
    {
        try {
            $handler = self::requireHandler();
        } catch (\Throwable $error) {
            $this->api->failInit($error);
            $this->reported = true;
            exit(1);
        }
        $this->initialized = true;
        return $handler;
    }

    /** Runs one invocation and posts its outcome. */
    public function invoke(callable $handler, Invocation $invocation): void
    {
        $this->current = $invocation->requestId();
        try {
            $event = $invocation->payload === '' ? null : json_decode($invocation->payload, true, 512, JSON_THROW_ON_ERROR);
        } catch (\JsonException $error) {
            $this->finish(fn () => $this->api->fail($this->current, new RuntimeError(
                'Runtime.InvalidEvent',
                "The event is not JSON: {$error->getMessage()}",
            )));
            return;
        }
        try {
            $result = $handler($event, $invocation->context);
        } catch (\Throwable $error) {
            $this->finish(fn () => $this->api->fail($this->current, $error));
            return;
        }
        try {
            $body = json_encode($result, JSON_FLAGS);
        } catch (\JsonException $error) {
            $where = self::invalidUtf8Path($result);
            $this->finish(fn () => $this->api->fail($this->current, new RuntimeError(
                'Runtime.MarshalError',
                "The handler's result cannot be encoded as JSON: {$error->getMessage()}"
                    . ($where === null ? '' : " (at $where)"),
            )));
            return;
        }
        $this->finish(fn () => $this->api->respond($this->current, $body));
    }

    /**
     * Called when PHP stops: after a fatal error, after exit() in the
     * handler, or after a failure of the runtime itself.
     */
    public function shutdown(): void
    {
        $last = error_get_last();
        $fatal = $last !== null && ($last['type'] & FATAL_ERRORS) !== 0;
        if ($this->reported || ($this->current === null && $this->initialized)) {
            return;
        }
        // A fatal error on the memory limit leaves no room to report it.
        ini_set('memory_limit', '-1');
        $error = $fatal
            ? new RuntimeError('Runtime.PhpFatalError', sprintf('%s in %s:%d', $last['message'], $last['file'], $last['line']))
            : new RuntimeError('Runtime.ExitError', $this->initialized
                ? 'The handler called exit() instead of returning'
                : 'The handler file called exit() while loading');
        try {
            if (!$this->initialized) {
                $this->api->failInit($error);
                exit(1);
            }
            $this->api->fail($this->current, $error);
        } catch (\Throwable $failure) {
            log_line("Cannot report the failure of invocation {$this->current}: {$failure->getMessage()}");
            exit(1);
        }
        exit(EXIT_RESTART);
    }

    /** Posts an outcome; the invocation is over once it is sent. */
    private function finish(callable $post): void
    {
        $post();
        $this->current = null;
    }

    private static function requireHandler(): callable
    {
        $taskRoot = getenv('LAMBDA_TASK_ROOT') ?: '/var/task';
        $name = getenv('_HANDLER');
        if ($name === false || $name === '') {
            throw new RuntimeError('Runtime.NoHandler', '_HANDLER is not set: it names the PHP file, relative to LAMBDA_TASK_ROOT, that returns the handler');
        }
        $autoload = "$taskRoot/vendor/autoload.php";
        if (is_file($autoload)) {
            require $autoload;
        }
        $file = "$taskRoot/$name";
        if (!is_file($file)) {
            throw new RuntimeError('Runtime.NoHandler', "The handler file $file does not exist (_HANDLER=$name)");
        }
        $handler = require $file;
        if (is_object($handler) && !is_callable($handler) && method_exists($handler, 'handle')) {
            $handler = [$handler, 'handle'];
        }
        if (!is_callable($handler)) {
            throw new RuntimeError(
                'Runtime.InvalidHandler',
                "The handler file $file returns " . get_debug_type($handler) . ', not a callable: end it with `return function ($event, $context) { ... };`',
            );
        }
        return $handler;
    }

    /** The path of the first string that is not valid UTF-8, such as `$.items[2].name`. */
    private static function invalidUtf8Path(mixed $value, string $path = '$'): ?string
    {
        if (is_string($value)) {
            return mb_check_encoding($value, 'UTF-8') ? null : $path;
        }
        if (is_object($value)) {
            $value = $value instanceof \JsonSerializable ? $value->jsonSerialize() : get_object_vars($value);
        }
        if (!is_array($value)) {
            return null;
        }
        foreach ($value as $key => $item) {
            if (is_string($key) && !mb_check_encoding($key, 'UTF-8')) {
                return "$path (a key)";
            }
            $found = self::invalidUtf8Path($item, is_int($key) ? "{$path}[$key]" : "$path.$key");
            if ($found !== null) {
                return $found;
            }
        }
        return null;
    }
}

$runtime = new FunctionRuntime(RuntimeApi::fromEnvironment());
register_shutdown_function([$runtime, 'shutdown']);
$handler = $runtime->loadHandler();
while (true) {
    $runtime->invoke($handler, $runtime->api->next());
}
