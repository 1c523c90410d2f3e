<?php
// The FPM runtime: starts php-fpm, then loops over the Runtime API: fetch
// the next HTTP event, send it to php-fpm as a FastCGI request, post the
// response in the event's response format.
//
// $_HANDLER names the PHP script, relative to $LAMBDA_TASK_ROOT, that
// php-fpm runs for every request (the front controller).
//
// When php-fpm times out before the invocation's deadline, or dies,
// that invocation fails and php-fpm is restarted before the next one.

declare(strict_types=1);

namespace PhpLambdaLayers\Runtime;

require __DIR__ . '/runtime-api.php';
require __DIR__ . '/fastcgi.php';
require __DIR__ . '/http-events.php';

/**
 * Milliseconds kept back before the invocation's deadline: time to stop
 * waiting for php-fpm and report the timeout before Lambda ends the
 * invocation itself.
 */
const DEADLINE_MARGIN_MS = 500;

$api = RuntimeApi::fromEnvironment();
$taskRoot = rtrim(getenv('LAMBDA_TASK_ROOT') ?: '/var/task', '/');
$handler = (string) getenv('_HANDLER');
$script = "$taskRoot/" . ltrim($handler, '/');
$fpm = new Fpm('/opt/bin/php-fpm', '/opt/bref/etc/php-fpm.conf', '/tmp/.php-fpm/php-fpm.sock');

try {
    if ($handler === '') {
        throw new RuntimeError('Runtime.NoHandler', '_HANDLER is not set: it names the PHP script, relative to LAMBDA_TASK_ROOT, that serves the HTTP requests');
    }
    if (!is_file($script)) {
        throw new RuntimeError('Runtime.NoHandler', "The handler script $script does not exist (_HANDLER=$handler)");
    }
    $fpm->start();
} catch (\Throwable $error) {
    $api->failInit($error);
    exit(1);
}

// The bridge itself may hit a fatal error, such as the memory limit on a
// huge response: report the invocation, stop php-fpm and let /opt/bootstrap
// start a fresh bridge.
$requestId = null;
register_shutdown_function(static function () use ($api, $fpm, &$requestId): void {
    $fpm->stop();
    $last = error_get_last();
    $fatal = E_ERROR | E_PARSE | E_CORE_ERROR | E_COMPILE_ERROR | E_USER_ERROR | E_RECOVERABLE_ERROR;
    if ($requestId === null || $last === null || ($last['type'] & $fatal) === 0) {
        return;
    }
    ini_set('memory_limit', '-1');
    $api->fail($requestId, new RuntimeError(
        'Runtime.PhpFatalError',
        sprintf('The FPM runtime failed: %s in %s:%d', $last['message'], $last['file'], $last['line']),
    ));
    exit(EXIT_RESTART);
});

while (true) {
    $requestId = null;
    $invocation = $api->next();
    $requestId = $invocation->requestId();
    try {
        if (!$fpm->isRunning()) {
            log_line('php-fpm exited between two invocations; starting it again');
            $fpm->restart();
        }
        $event = json_decode($invocation->payload, true, 512, JSON_THROW_ON_ERROR);
        $request = HttpRequest::fromEvent($event);
        $deadline = ($invocation->context->getDeadlineMs() - DEADLINE_MARGIN_MS) / 1000;
        $reply = $fpm->request($request->fastCgiParams($script, $taskRoot, $invocation->context), $request->body, $deadline);
        if ($reply->stderr !== '') {
            log_line("php-fpm stderr for invocation $requestId: {$reply->stderr}");
        }
        $response = $request->response($reply->stdout);
    } catch (FpmTimeout $error) {
        $api->fail($requestId, new RuntimeError(
            'Runtime.FpmTimeout',
            "The script timed out: no response before the invocation's deadline. php-fpm is restarted",
        ));
        $requestId = null;
        $fpm->restart();
        continue;
    } catch (FpmUnavailable $error) {
        $api->fail($requestId, new RuntimeError('Runtime.FpmUnavailable', "{$error->getMessage()}. php-fpm is restarted"));
        $requestId = null;
        $fpm->restart();
        continue;
    } catch (\JsonException $error) {
        $api->fail($requestId, new RuntimeError('Runtime.InvalidEvent', "The event is not JSON: {$error->getMessage()}"));
        continue;
    } catch (RuntimeError $error) {
        $api->fail($requestId, $error);
        continue;
    }
    try {
        $body = json_encode($response, JSON_FLAGS);
    } catch (\JsonException $error) {
        // Header values are the only text that may not be UTF-8: the body
        // goes as base64 when it is not text.
        log_line("The response headers of invocation $requestId are not valid UTF-8; invalid bytes are replaced with U+FFFD");
        $body = json_encode($response, JSON_FLAGS | JSON_INVALID_UTF8_SUBSTITUTE);
    }
    $api->respond($requestId, $body);
}
